"""What an export's manifest says about the source model, read from its transformers folder (or hub id).

One place for the facts every export path records, whatever builds the graph:
- end-of-sequence ids: the union of the model config's, ``generation_config.json``'s and the tokenizer's
  (chat models list several: Phi-3's generation config has 32000, 32001 and 32007 where its tokenizer
  names only 32000; keeping one lets a chat model run past its end of turn);
- the context limit (``max_positions``): the most positions the model's position embedding or rotary
  table was built for; the edge refuses to feed more;
- the files an ONNX graph needs beside itself (external-data weights such as ``model.onnx_data``): the
  manifest lists them so the edge can say which is missing instead of failing inside ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

# Config attributes that bound the positions a model can attend to, by architecture family.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def eos_token_ids(model_source: str) -> list[int]:
    """Every id that ends a generation: config, generation config and tokenizer, first-seen order."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    found: list = [getattr(AutoConfig.from_pretrained(model_source), "eos_token_id", None)]
    try:
        found.append(GenerationConfig.from_pretrained(model_source).eos_token_id)
    except OSError:  # no generation_config.json: the config and tokenizer are all there is
        pass
    found.append(AutoTokenizer.from_pretrained(model_source).eos_token_id)
    ids: list[int] = []
    for value in found:
        for eos in value if isinstance(value, (list, tuple)) else [value]:
            if eos is not None and int(eos) not in ids:
                ids.append(int(eos))
    return ids


def max_positions(config) -> int | None:
    """The model's context limit from its config, or None when the architecture states none."""
    text_config = getattr(config, "text_config", None) or config
    for key in _MAX_POSITION_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def external_data_files(onnx_path: Path) -> list[str]:
    """Files (relative to the graph's folder) that hold the graph's external-data tensors, sorted."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for tensor in _tensors(model.graph):
        if uses_external_data(tensor):
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)


def _tensors(graph):
    """Initializers and constant tensors of ``graph`` and of every subgraph (If / Loop bodies)."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors(sub)

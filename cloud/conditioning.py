"""The LLM's hidden states of a prompt at one layer, for LLM-to-SLM prompt conditioning (arXiv 2402.16844).

Layer ``k`` means transformers' ``hidden_states[k]`` (what ``output_hidden_states=True`` returns): 0 = the
embeddings as the first decoder layer receives them, 1..L-1 = the output of decoder layer k (the input of layer
k + 1), L = the last layer's output after the model's final norm (``last_hidden_state``).

They are taken with forward hooks during the forward the verifier runs anyway, not with
``output_hidden_states=True``: that keeps every layer's states of every row of a batch alive (L + 1 tensors of
[rows, tokens, hidden]) when only one layer of a few rows is wanted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def decoder_blocks(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the base model, its decoder layers) of a transformers causal LM (``model.model.layers`` and alike)."""
    base = model.get_decoder()
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layer list (model.get_decoder().layers): prompt "
                        "conditioning is not available for it")
    return base, layers


def decoder_layer_count(model) -> int:
    """L: the largest layer a session may ask for (``hidden_states`` has L + 1 entries); 0 when unknown."""
    try:
        return len(decoder_blocks(model)[1])
    except (TypeError, AttributeError):
        return 0


@contextlib.contextmanager
def capture_hidden_states(model, layers: set[int]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each forward of ``model`` puts ``hidden_states[k]`` ([rows, fed tokens, hidden]) for each k of
    ``layers`` in the yielded dict. Nothing is hooked when ``layers`` is empty."""
    captured: dict[int, torch.Tensor] = {}
    if not layers:
        yield captured
        return
    base, blocks = decoder_blocks(model)
    handles = []
    for k in sorted(layers):
        if k < len(blocks):  # hidden_states[k] is what decoder layer k receives
            def before_layer(module, args, kwargs, k=k):
                captured[k] = args[0] if args else kwargs["hidden_states"]
            handles.append(blocks[k].register_forward_pre_hook(before_layer, with_kwargs=True))
        else:  # hidden_states[L]: the base model's output, after the final norm
            def after_model(module, args, output, k=k):
                captured[k] = output[0]
            handles.append(base.register_forward_hook(after_model))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()

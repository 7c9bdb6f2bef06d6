"""The export manifest (`manifest.json` beside `model.onnx`): what the edge loads and what it tells the cloud.

Written by ``python -m models export``; read by the edge runtime and CLI. Its ``fingerprint`` (tokenizer
hash, id space N, logit width) is what the edge sends in Open; the verifier pairs on the hash and N only
(proto/fingerprint.py). Format 1 manifests (``vocab_size`` = the logit width, no id space) still load: the
id space is then computed from the folder's ``tokenizer.json``. A prompt-conditioned SLM (LLM-to-SLM,
``models/conditioned.py``) records ``conditioning``: which LLM hidden state its graph's extra input takes
(``ConditioningSpec``); absent (null) for every other model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from proto.fingerprint import id_space

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: id_space and logit_width replace vocab_size
RUNTIMES = ("ort", "genai")  # the edge runtimes a manifest can name
GENAI_CONFIG = "genai_config.json"  # what onnxruntime-genai loads a folder by (written by its model builder)


class ModelFolderError(ValueError):
    """A model folder that cannot be used, with a message a person can act on."""


@dataclass(frozen=True)
class ConditioningSpec:
    """What a prompt-conditioned SLM's graph takes besides the ids: the frozen LLM's hidden state
    (``output_hidden_states`` index ``layer``: 0 = embeddings, L = the last layer's), ``dim`` wide, per new
    position, fed as the input named ``input``; zero rows (every non-prompt position) mean no conditioning."""

    layer: int
    dim: int
    input: str


@dataclass
class Manifest:
    source: str  # hub id or local folder the export came from
    model_file: str
    model_type: str
    logit_width: int  # the model's logit rows (padding included); recorded, never compared
    id_space: int  # N = the tokenizer's largest id + 1; logits are sliced to it
    tokenizer_hash: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    inputs: list[str]
    outputs: list[str]
    dtype: str  # fp32 | fp16 | int8 | int4 (int4: genai exports only)
    opset: int
    parity: dict = field(default_factory=dict)  # max abs logit diff vs PyTorch, tolerance, prompts
    format: int = FORMAT_VERSION
    # Files the graph needs beside it (external-data weights, e.g. model.onnx_data); copy them with it.
    external_data: list[str] = field(default_factory=list)
    max_positions: int | None = None  # the model's context limit (prompt + generated); None = not stated
    # Which edge runtime runs the folder: "ort" (optimum's graph, edge/runtime.py) or "genai" (onnxruntime-genai's
    # model builder, edge/genai_runtime.py). Manifests written before genai exports existed are "ort".
    runtime: str = "ort"
    # The id a span-learned SLM draws to hand the rest of a step to the LLM (edge/coarse.py, mode span-learned);
    # None for any other model. An existing id of the tokenizer (inside the id space), never a token of the text.
    offload_marker_id: int | None = None
    # A prompt-conditioned SLM's extra input ({"layer": k, "dim": H_llm, "input": "llm_hidden"}, ConditioningSpec);
    # None for an unconditioned model (every manifest written before conditioning existed).
    conditioning: dict | None = None

    @property
    def conditioning_spec(self) -> ConditioningSpec | None:
        """``conditioning`` as a ConditioningSpec (checked at load), or None for an unconditioned model."""
        return None if self.conditioning is None else ConditioningSpec(**self.conditioning)

    @property
    def required_files(self) -> list[str]:
        """Every file of the folder the edge loads: graph, its external data, tokenizer, this manifest."""
        runtime_config = [GENAI_CONFIG] if self.runtime == "genai" else []  # onnxruntime-genai reads it
        return [self.model_file, *self.external_data, *runtime_config, "tokenizer.json", MANIFEST_NAME]

    @property
    def fingerprint(self) -> dict:
        """What the edge sends in Open (``proto.messages.fingerprint_to_msg``)."""
        return {"tokenizer_hash": self.tokenizer_hash, "id_space": self.id_space, "logit_width": self.logit_width}

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check ``folder/manifest.json``; raises ModelFolderError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        hint = " (it holds no .onnx file either)" if not any(folder.glob("*.onnx")) else ""
        raise ModelFolderError(
            f"{folder} is not an ONNX export: no {MANIFEST_NAME}{hint}; "
            f"create one with: python -m models export --model MODEL --out {folder}"
        )
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(f"{folder} lacks tokenizer.json; re-run python -m models export")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**_upgrade_format_1(data, folder))
    except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as exc:
        raise ModelFolderError(f"{path} is not a valid manifest: {exc}") from None
    if manifest.format != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has manifest format {manifest.format}, expected {FORMAT_VERSION}")
    _check_fields(manifest, path)
    missing = [name for name in manifest.required_files if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{folder} lacks {', '.join(missing)} (an export folder needs "
                               f"{', '.join(manifest.required_files)}): copy the whole folder, or re-run "
                               "python -m models export")
    return manifest


def _check_fields(manifest: Manifest, path: Path) -> None:
    """The fields the edge acts on have the right types; listed files are plain names in the folder."""
    files = manifest.external_data
    if not isinstance(files, list) or not all(isinstance(f, str) and f and Path(f).name == f for f in files):
        raise ModelFolderError(f"{path}: external_data must be a list of file names in the folder, got "
                               f"{str(files)[:200]}")
    if manifest.runtime not in RUNTIMES:
        raise ModelFolderError(f"{path}: runtime must be one of {', '.join(RUNTIMES)}, got {str(manifest.runtime)[:50]}")
    marker = manifest.offload_marker_id
    if marker is not None and (isinstance(marker, bool) or not isinstance(marker, int)
                               or not 0 <= marker < manifest.id_space):
        raise ModelFolderError(f"{path}: offload_marker_id must be null or an integer id in 0..{manifest.id_space - 1} "
                               f"(the id space), got {str(marker)[:50]}")
    _check_conditioning(manifest, path)
    limit = manifest.max_positions
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ModelFolderError(f"{path}: max_positions must be a positive integer or null, got {str(limit)[:50]}")


def _check_conditioning(manifest: Manifest, path: Path) -> None:
    """``conditioning`` is null, or exactly {layer: int >= 0, dim: int >= 1, input: a name the graph declares}, on
    an ort export (the genai runtime feeds no extra input)."""
    spec = manifest.conditioning
    if spec is None:
        return
    keys = {f.name for f in fields(ConditioningSpec)}
    if not isinstance(spec, dict) or set(spec) != keys:
        raise ModelFolderError(f"{path}: conditioning must be null or {{\"layer\", \"dim\", \"input\"}}, got "
                               f"{str(spec)[:100]}")
    layer, dim, name = spec["layer"], spec["dim"], spec["input"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ModelFolderError(f"{path}: conditioning.layer must be an integer >= 0, got {str(layer)[:50]}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ModelFolderError(f"{path}: conditioning.dim must be an integer >= 1, got {str(dim)[:50]}")
    if not isinstance(name, str) or name not in manifest.inputs:
        raise ModelFolderError(f"{path}: conditioning.input must name one of the graph's inputs "
                               f"({', '.join(map(str, manifest.inputs))}), got {str(name)[:50]}")
    if manifest.runtime != "ort":
        raise ModelFolderError(f"{path}: a conditioned model runs on the ort runtime only, got {manifest.runtime}")


def _upgrade_format_1(data: dict, folder: Path) -> dict:
    """A format-1 manifest's fields in today's terms: its ``vocab_size`` was the logit width, and its id
    space is that of the folder's tokenizer. Any other manifest is returned as it is."""
    if data.get("format") != 1:
        return data
    upgraded = {k: v for k, v in data.items() if k != "vocab_size"}
    upgraded.update(format=FORMAT_VERSION, logit_width=data["vocab_size"],
                    id_space=id_space(folder / "tokenizer.json"))
    return upgraded

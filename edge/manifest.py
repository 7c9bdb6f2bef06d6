"""The export manifest (`manifest.json` beside `model.onnx`): what the edge loads and what it tells the cloud.

Written by ``python -m models export``; read by the edge runtime and CLI. Its ``fingerprint`` (vocab size,
tokenizer hash) is what edge and verifier compare before pairing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ModelFolderError(ValueError):
    """A model folder that cannot be used, with a message a person can act on."""


@dataclass
class Manifest:
    source: str  # hub id or local folder the export came from
    model_file: str
    model_type: str
    vocab_size: int
    tokenizer_hash: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    inputs: list[str]
    outputs: list[str]
    dtype: str  # fp32 | fp16 | int8
    opset: int
    parity: dict = field(default_factory=dict)  # max abs logit diff vs PyTorch, tolerance, prompts
    format: int = FORMAT_VERSION

    @property
    def fingerprint(self) -> dict:
        return {"vocab_size": self.vocab_size, "tokenizer_hash": self.tokenizer_hash}

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
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelFolderError(f"{path} is not a valid manifest: {exc}") from None
    if manifest.format != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has manifest format {manifest.format}, expected {FORMAT_VERSION}")
    for needed in (manifest.model_file, "tokenizer.json"):
        if not (folder / needed).is_file():
            raise ModelFolderError(f"{folder} lacks {needed}; re-run python -m models export")
    return manifest

"""The models the edge decode benchmark times, built and exported once into a cache and reused.

Two models: the demo SLM (already trained, from ``models/demo_pair``) and a ~50M-parameter Llama built
locally from a config with random weights (hidden 512, 8 layers, 32k vocabulary: the size class where
per-token edge costs look like a real small model's). Each is exported to ONNX fp32 and int8 with
``models.export.export_model``; the PyTorch side runs the transformers folder in fp32 eager.

Every built folder carries a stamp (``bench_stamp.json``) of what it was built from: the config, seed and
tokenizer hash for the random Llama, a sha256 of the weights for an export. A folder whose stamp matches
is reused, so a second ``make bench`` skips the build and exports, and a retrained SLM forces new ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SLM_DIR = Path("models/demo_pair/slm")
DEFAULT_CACHE_DIR = Path("reports/bench_cache")
DTYPES = ("fp32", "int8")
STAMP_NAME = "bench_stamp.json"


@dataclass
class BenchModel:
    """One model under test: its transformers folder (PyTorch side) and one ONNX export per dtype."""

    name: str
    hf_dir: Path
    onnx_dirs: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # dtype -> why there is no export to time


# ---------------------------------------------------------------- configs


def llama_50m_config(tokenizer_source: str | Path):
    """The ~50M random Llama of the issue (about 42M parameters, 16M of them the tied 32k embedding)."""
    return small_llama_config(tokenizer_source, hidden=512, layers=8, heads=8, intermediate=1376)


def small_llama_config(tokenizer_source: str | Path, hidden: int, layers: int, heads: int, intermediate: int):
    """A LlamaConfig with the demo tokenizer's vocabulary and special ids (so EOS/pad mean the same)."""
    from transformers import AutoTokenizer, LlamaConfig

    from proto.fingerprint import id_space

    tok = AutoTokenizer.from_pretrained(str(tokenizer_source))
    return LlamaConfig(
        vocab_size=id_space(tok),  # one logit row per id the tokenizer can produce
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


# ---------------------------------------------------------------- cache stamps and hashes


def _read_stamp(folder: Path) -> dict | None:
    path = folder / STAMP_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stamp(folder: Path, stamp: dict) -> None:
    (folder / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _files_digest(folder: Path, names: tuple[str, ...]) -> str:
    """sha256 of the named files (first 16 hex digits): a retrained demo SLM must invalidate its exports."""
    digest = hashlib.sha256()
    for name in names:
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):  # 4 MiB chunks
                digest.update(chunk)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- building and exporting


def build_random_llama(config, out_dir: Path, tokenizer_source: str | Path, seed: int = 0) -> Path:
    """Random-weight LlamaForCausalLM + the demo tokenizer saved in ``out_dir``; reused when unchanged."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    from proto.fingerprint import tokenizer_hash

    # By content, not path: the same tokenizer copied elsewhere must not force a rebuild and re-export.
    tok_hash = tokenizer_hash(Path(tokenizer_source) / "tokenizer.json")
    stamp = {"config": config.to_json_string(use_diff=True), "seed": seed, "tokenizer": tok_hash}
    if _read_stamp(out_dir) == stamp and (out_dir / "model.safetensors").is_file():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    torch.manual_seed(seed)  # random weights, but the same ones on every build
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out_dir))
    _write_stamp(out_dir, stamp)
    return out_dir


def export_cached(hf_dir: Path, out_dir: Path, dtype: str) -> Path:
    """ONNX export of ``hf_dir`` in ``dtype`` (fp32 | int8) into ``out_dir``, redone only if the weights changed."""
    from models.export import export_model

    stamp = {"weights": _files_digest(hf_dir, ("config.json", "model.safetensors")), "dtype": dtype}
    if _read_stamp(out_dir) == stamp and (out_dir / "manifest.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    export_model(str(hf_dir), out_dir, int8=(dtype == "int8"))
    _write_stamp(out_dir, stamp)
    return out_dir


def prepare_model(name: str, hf_dir: Path, cache_dir: Path, dtypes: tuple[str, ...] = DTYPES) -> BenchModel:
    """A BenchModel whose ONNX exports exist in ``cache_dir`` (exporting what is missing or stale).

    An export that fails its parity check (int8 can, on a small trained model with large logits) is
    not timed: a fast but wrong model proves nothing. Its row says why instead of aborting the bench.
    """
    from models.export import ExportError

    bench_model = BenchModel(name, Path(hf_dir))
    for dtype in dtypes:
        try:
            bench_model.onnx_dirs[dtype] = export_cached(
                Path(hf_dir), Path(cache_dir) / f"{name}_onnx_{dtype}", dtype
            )
        except ExportError as exc:
            bench_model.skipped[dtype] = f"export failed: {exc}"
    return bench_model


def prepare_default_models(
    slm_dir: Path, cache_dir: Path, dtypes: tuple[str, ...] = DTYPES
) -> list[BenchModel]:
    """The issue's two models: the demo SLM and the 50M random Llama (built with the SLM's tokenizer)."""
    slm_dir, cache_dir = Path(slm_dir), Path(cache_dir)
    if not (slm_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"demo SLM not found at {slm_dir} (build it with `python -m models demo-pair`)"
        )
    llama_dir = build_random_llama(llama_50m_config(slm_dir), cache_dir / "llama-50m", slm_dir)
    return [
        prepare_model("demo-slm", slm_dir, cache_dir, dtypes),
        prepare_model("llama-50m", llama_dir, cache_dir, dtypes),
    ]

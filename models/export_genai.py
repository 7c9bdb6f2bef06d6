"""Export a causal LM for the edge with onnxruntime-genai's model builder (``--builder genai``).

The builder (``python -m onnxruntime_genai.models.builder``) writes a graph made for onnxruntime-genai: fused
GroupQueryAttention over one past/present KV buffer shared across steps, MatMulNBits int4/int8 weights, the
tied embedding stored once. It imports transformers >= 5, while this environment pins 4.57.6 (optimum-onnx
caps it below 4.58), so it runs as a subprocess in its own environment, ``.venv-genai-build`` (``make
genai-builder``; pins in ``constraints-genai-build.txt``). Everything after the build runs here, exactly as in
the optimum path (``models/export.py``): the tokenizer files are written by this environment's transformers
(the hash, id space and encoding are then those of an optimum export of the same model), the parity check
compares logits with PyTorch over every logit row through the edge's own genai runtime (prefill and a cached
decode step), and the manifest has the same fields, plus ``runtime: "genai"``.

Precisions: fp32, int8 and int4 are built for the CPU; fp16 for CUDA (the builder has no fp16 CPU
combination: its ``-e cpu -p fp16`` graph fails at run time on ORT 1.31), which also runs on the CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edge.manifest import Manifest
from models.export import PARITY_PROMPTS, ExportError, _opset, offload_marker_id, parity_check
from models.metadata import eos_token_ids, external_data_files, max_positions
from proto.fingerprint import check_logit_width, id_space, tokenizer_hash

ROOT = Path(__file__).resolve().parents[1]
BUILDER_VENV = ROOT / ".venv-genai-build"
BUILDER_PYTHON_ENV = "GENAI_BUILDER_PYTHON"  # overrides the builder environment's interpreter
PRECISIONS = ("fp32", "fp16", "int8", "int4")
BUILDER_EP = {"fp32": "cpu", "fp16": "cuda", "int8": "cpu", "int4": "cpu"}
# Max |logit difference| vs PyTorch fp32. fp32 is exact up to float rounding (measured 2e-7 to 7e-6); int8 and
# int4 are block-wise weight quantization (MatMulNBits, blocks of 32, int8 activations), whose error grows with
# the logits' scale. Measured on the trained demo pair (SLM / LLM): int8 0.46 / 0.28, int4 2.47 / 3.12 (top-1
# agreement 0.96 / 0.83); random-weight models stay far below (int4 0.13). About 2x headroom over the worst.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 1.5, "int4": 6.0}
MODEL_FILE = "model.onnx"  # the builder's name for the decoder graph (genai_config.json: decoder.filename)
BUILD_TIMEOUT_S = 3600


def builder_python() -> Path:
    """The interpreter of the builder environment; ExportError saying how to create it when it is missing."""
    python = Path(os.environ.get(BUILDER_PYTHON_ENV) or BUILDER_VENV / "bin" / "python")
    if not python.is_file():
        raise ExportError(f"the genai model builder environment is missing ({python}): create it with "
                          "`make genai-builder` (or set GENAI_BUILDER_PYTHON)")
    return python


def build_command(python: Path, model: str, out: Path, precision: str, cache_dir: Path) -> list[str]:
    """The builder's command line: a local folder is read as it is (-i), a hub id is downloaded (-c)."""
    source = ["-m", model, "-i", model] if Path(model).is_dir() else ["-m", model]
    return [str(python), "-m", "onnxruntime_genai.models.builder", *source, "-o", str(out), "-p", precision,
            "-e", BUILDER_EP[precision], "-c", str(cache_dir)]


def run_builder(model: str, out: Path, precision: str, cache_dir: Path) -> None:
    """Run the builder in its own environment; ExportError with the end of its output when it fails."""
    command = build_command(builder_python(), model, out, precision, cache_dir)
    # PYTHONPATH is this environment's business: the builder must import only its own environment's packages.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise ExportError(f"the genai model builder failed (exit {proc.returncode}): " + "\n".join(tail))


def write_tokenizer(model: str, out: Path) -> None:
    """This environment's tokenizer files, as the optimum path writes them: the builder's transformers 5
    rewrites tokenizer.json (another post-processor, another tokenizer_config.json); the edge must encode
    exactly as the verifier's tokenizer does, and the hash must match an optimum export of the same model."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model).save_pretrained(str(out))


def graph_io(onnx_path: Path) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph, without loading its weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def check_parity(model: str, folder: Path, precision: str) -> dict:
    """Parity through the genai runtime (every logit row); ExportError above the precision's tolerance."""
    import onnxruntime_genai as og

    from edge.genai_runtime import GenaiCausalLM

    runtime = GenaiCausalLM(folder, providers="cpu")  # id_space None: the whole output layer is compared
    parity = parity_check(model, None, PARITY_PROMPTS, runtime=runtime)
    parity.update(tolerance=TOLERANCE[precision], runtime=f"onnxruntime-genai {og.__version__}")
    if parity["max_abs_diff"] > parity["tolerance"]:
        raise ExportError(f"genai logits differ from PyTorch by {parity['max_abs_diff']:.3g} (> tolerance "
                          f"{parity['tolerance']} for {precision}); the export is not trustworthy")
    parity["logit_width"] = runtime.logit_width
    return parity


def export_genai(model: str, out: Path, precision: str = "fp32") -> Manifest:
    """Build ``model`` with the genai builder into ``out`` (model.onnx, its data, genai_config.json, tokenizer,
    manifest.json) at ``precision``; returns the manifest."""
    from transformers import AutoConfig, AutoTokenizer

    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp) / "export"
        run_builder(model, staging, precision, Path(tmp) / "hf_cache")
        write_tokenizer(model, staging)
        parity = check_parity(model, staging, precision)
        logit_width = parity.pop("logit_width")
        n = id_space(staging / "tokenizer.json")
        try:
            check_logit_width(logit_width, n, f"{model} (exported)")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        config = AutoConfig.from_pretrained(model)
        inputs, outputs = graph_io(staging / MODEL_FILE)
        manifest = Manifest(
            source=str(model),
            model_file=MODEL_FILE,
            model_type=config.model_type,
            logit_width=logit_width,
            id_space=n,
            tokenizer_hash=tokenizer_hash(staging / "tokenizer.json"),
            bos_token_id=AutoTokenizer.from_pretrained(model).bos_token_id,
            eos_token_ids=eos_token_ids(model),
            inputs=inputs,
            outputs=outputs,
            dtype=precision,
            opset=_opset(staging / MODEL_FILE),
            parity=parity,
            external_data=external_data_files(staging / MODEL_FILE),
            max_positions=max_positions(config),
            runtime="genai",
            offload_marker_id=offload_marker_id(model, n),
        )
        manifest.save(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), str(out))
    return manifest

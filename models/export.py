"""Export a causal LM (hub id or local folder) to ONNX for the edge, check parity, write the manifest.

The path is the one real models take: optimum's ONNX exporter (``onnx_export_from_model``, task
``text-generation-with-past``) on the model loaded with the attention implementation its config needs
(``cloud/attention.py``: eager for Gemma-2's soft-capping), which the parity reference and the verifier use too.
Options: ``fp16`` (float16 weights and compute, fp32 inputs/outputs so the edge feeds the same arrays),
``int8`` (dynamic quantization of MatMul only: with tied embeddings, quantizing the Gather too makes
decoding slower). Afterwards ONNX logits are compared with PyTorch's on a few prompts, through the edge's
own runtime (prefill and a KV-cached decode step), over every logit row; the export fails above a
tolerance. The manifest records the model's logit width and the tokenizer's id space N (the edge slices
logits to N); a model with fewer rows than N is refused. A span-learned SLM's folder names its offload marker
in ``span_marker.json`` (``models/span_marker.py``); the manifest copies it as ``offload_marker_id``.
A prompt-conditioned SLM's folder (``conditioning.json``, ``models/conditioned.py``) is exported with its projector
inside the graph and one more input, ``llm_hidden``, through the same optimum call with a custom ONNX config
(``custom_onnx_configs``); its parity check feeds non-zero conditioning at prefill, and the manifest records
``conditioning``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from cloud.attention import attn_implementation
from edge.manifest import Manifest
from edge.runtime import OnnxCausalLM
from models.conditioned import (conditioned_onnx_config, load_conditioned, manifest_conditioning, parity_rows,
                                read_conditioning)
from models.metadata import eos_token_ids, external_data_files, max_positions
from models.span_marker import MARKER_FILE, read_marker_id
from proto.fingerprint import check_logit_width, id_space, tokenizer_hash

MODEL_FILE = "model.onnx"
# Max |logit difference| allowed vs PyTorch fp32, per export dtype. int8 is a lossy approximation
# (measured ~1.1 on the demo SLM); the manifest records the actual difference and top-1 agreement.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 2.5}
PARITY_PROMPTS = ["Q:7+5-3+8 A:", "def main():\n    return", "The quick brown fox"]


class ExportError(RuntimeError):
    pass


def load_reference(model_source: str):
    """The PyTorch model in fp32, with the attention implementation its config needs (cloud/attention.py):
    what the graph is traced from, what parity compares against, what the verifier runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if read_conditioning(model_source) is not None:  # the SLM with its projector: the graph holds both
        return load_conditioned(model_source)
    attn = attn_implementation(AutoConfig.from_pretrained(model_source))
    return AutoModelForCausalLM.from_pretrained(model_source, dtype=torch.float32, attn_implementation=attn).eval()


def _optimum_export(model: str, out: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.utils.save_utils import maybe_load_preprocessors

    # optimum's main_export loads the model itself with transformers' default attention (sdpa, which drops
    # Gemma-2's attention soft-capping) and passes no loading arguments through (its model_kwargs go to
    # forward): so the model is loaded here and handed to onnx_export_from_model, which main_export ends with.
    reference = load_reference(model)
    reference.config.use_cache = True  # as main_export does for a -with-past task
    conditioning = read_conditioning(model)
    custom = None if conditioning is None else {"model": conditioned_onnx_config(reference, conditioning["dim"])}
    onnx_export_from_model(
        reference,
        output=out,
        task="text-generation-with-past",
        device="cpu",
        do_validation=False,  # parity is checked below, through the edge runtime itself
        preprocessors=maybe_load_preprocessors(model),
        custom_onnx_configs=custom,  # a conditioned SLM: optimum's Llama config plus the llm_hidden input
    )


def _convert_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    # keep_io_types: inputs, outputs and the KV cache stay fp32, so the edge code is dtype-agnostic.
    model = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(model, str(path))


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("model.int8.onnx")
    quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    for stale in path.parent.glob(MODEL_FILE + "*"):  # model.onnx and any external-data file
        stale.unlink()
    tmp.rename(path)


def parity_check(model_source: str, onnx_path: Path | None, prompts: list[str] = PARITY_PROMPTS,
                 runtime=None) -> dict:
    """Max |logits_onnx - logits_torch| over prompt positions and one cached decode step per prompt, through
    ``runtime`` (any edge runtime returning every logit row; default: ORT on ``onnx_path``)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source)
    reference = load_reference(model_source)  # Gemma-2: eager, so the reference applies its soft-capping
    runtime = runtime or OnnxCausalLM(onnx_path, providers="cpu")
    conditioning = read_conditioning(model_source)
    worst, top1_agree, n = 0.0, 0, 0
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) < 2:
            raise ExportError(f"parity prompt {prompt!r} tokenizes to fewer than 2 tokens")
        # a conditioned SLM: non-zero rows at prefill (one zero row inside), zeros at the cached step (as the edge)
        rows = None if conditioning is None else parity_rows(len(ids), conditioning["dim"], seed=n)  # [T, dim]
        extra = {} if rows is None else {"llm_hidden": torch.from_numpy(rows)[None]}
        with torch.inference_mode():
            ref = reference(torch.tensor([ids]), **extra).logits[0].numpy()  # [T, V]
        runtime.reset()
        prefix = (runtime.forward(ids[:-1]) if rows is None  # [T-1, V] in one prefill
                  else runtime.forward(ids[:-1], conditioning=rows[:-1]))
        last = runtime.decode(ids[-1])[None, :]  # [1, V]: the last position through the KV cache
        got = np.concatenate([prefix, last])
        worst = max(worst, float(np.abs(got - ref).max()))
        top1_agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n += len(ids)
    return {"max_abs_diff": worst, "top1_agreement": top1_agree / n, "positions": n, "prompts": len(prompts)}


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def offload_marker_id(model_source: str, n: int) -> int | None:
    """The offload marker a span-learned SLM's folder declares (``span_marker.json``), checked against the id
    space ``n``; None for a folder without one or a hub id."""
    try:
        marker = read_marker_id(model_source) if Path(model_source).is_dir() else None
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if marker is not None and not 0 <= marker < n:
        raise ExportError(f"{Path(model_source) / MARKER_FILE}: offload_marker_id {marker} is outside the id space "
                          f"0..{n - 1}")
    return marker


def export_model(model: str, out: Path, fp16: bool = False, int8: bool = False) -> Manifest:
    """Export ``model`` into ``out`` (model.onnx, tokenizer, manifest.json); returns the manifest."""
    if fp16 and int8:
        raise ExportError("choose at most one of --fp16 and --int8")
    dtype = "fp16" if fp16 else "int8" if int8 else "fp32"
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp) / "export"
        _optimum_export(model, staging)
        onnx_path = staging / MODEL_FILE
        if fp16:
            _convert_fp16(onnx_path)
        if int8:
            _quantize_int8(onnx_path)
        parity = parity_check(model, onnx_path)
        parity["tolerance"] = TOLERANCE[dtype]
        if parity["max_abs_diff"] > parity["tolerance"]:
            raise ExportError(
                f"ONNX logits differ from PyTorch by {parity['max_abs_diff']:.3g} "
                f"(> tolerance {parity['tolerance']} for {dtype}); the export is not trustworthy"
            )
        runtime = OnnxCausalLM(onnx_path, providers="cpu")  # every logit row: the width is what it records
        from transformers import AutoConfig, AutoTokenizer

        if not (staging / "tokenizer.json").is_file():
            AutoTokenizer.from_pretrained(model).save_pretrained(str(staging))
        n = id_space(staging / "tokenizer.json")
        try:
            check_logit_width(runtime.logit_width, n, f"{model} (exported)")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        tok = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
        manifest = Manifest(
            source=str(model),
            model_file=MODEL_FILE,
            model_type=config.model_type,
            logit_width=runtime.logit_width,
            id_space=n,
            tokenizer_hash=tokenizer_hash(staging / "tokenizer.json"),
            bos_token_id=tok.bos_token_id,
            eos_token_ids=eos_token_ids(model),
            inputs=[i.name for i in runtime.session.get_inputs()],
            outputs=[o.name for o in runtime.session.get_outputs()],
            dtype=dtype,
            opset=_opset(onnx_path),
            parity=parity,
            external_data=external_data_files(onnx_path),
            max_positions=max_positions(config),
            offload_marker_id=offload_marker_id(model, n),
            conditioning=manifest_conditioning(model),
        )
        manifest.save(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), str(out))
    return manifest

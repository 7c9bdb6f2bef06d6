"""Timing of the edge decode benchmark: ONNX Runtime edge loop vs PyTorch eager ``generate``, same weights,
same CPU threads, medians over interleaved repeats.

How a decode step is timed, identically on both sides: a step is one forward pass of one new token
through the KV cache plus choosing the next token. Prefill is excluded.
- PyTorch: ``generate`` has no per-step hook, so time-per-step = (t(N new tokens) - t(1 new token)) /
  (N - 1). ``generate(max_new_tokens=1)`` is prefill + first argmax + generate's own setup, so the
  difference is exactly N - 1 cached decode steps.
- ONNX: ``GenerationResult.decode_seconds`` (prefill excluded) covers the same N - 1 forward passes,
  plus N token choices (one more than PyTorch's difference holds). Dividing it by N - 1 charges that
  extra argmax to ONNX, so the comparison errs against the edge, never for it.
The edge loop's time is further split into ORT forward (``forward_seconds``) and everything else in the
loop (``loop_overhead``). Repeats are interleaved (onnx fp32, onnx int8, torch, onnx fp32, ...) so that a
load change on the machine hits all variants alike; every number reported is a median over repeats.
"""

from __future__ import annotations

import os
import statistics
import time

from bench.decode_models import BenchModel

PROMPT = "Q:7+5-3+8 A:"  # a fixed demo-task prompt: both runtimes decode after the same ids


# ---------------------------------------------------------------- one timed run of each runtime


def onnx_decode_run(edge_model, prompt_ids: list[int], n_tokens: int) -> dict:
    """Greedy edge loop for exactly ``n_tokens`` tokens; seconds per decode step, split forward vs the rest."""
    from edge.generate import generate_local
    from core.sampling import SamplingSettings

    result = generate_local(
        edge_model, prompt_ids, n_tokens, SamplingSettings(temperature=0.0), seed=0, stop_at_eos=False
    )
    steps = n_tokens - 1  # forward passes in the loop: the last token needs none (see module docstring)
    return {
        "step_s": result.decode_seconds / steps,  # seconds per decode step
        "forward_s": result.forward_seconds / steps,  # of which ORT forward, seconds per step
        "loop_overhead": result.loop_overhead,  # share (0..1) of the loop outside ORT forward
    }


def torch_generate_seconds(model, input_ids, n_tokens: int) -> float:
    """Wall time of one greedy ``generate`` producing exactly ``n_tokens`` new tokens (EOS suppressed).

    ``input_ids``: int64 tensor (1, prompt length).
    """
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,  # never stop early at EOS: every run decodes the same count
            use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )
        return time.perf_counter() - t0


def torch_decode_run(model, input_ids, n_tokens: int) -> dict:
    """Seconds per decode step of PyTorch eager: (t(N) - t(1)) / (N - 1), which cancels the prefill."""
    t_one = torch_generate_seconds(model, input_ids, 1)
    t_all = torch_generate_seconds(model, input_ids, n_tokens)
    return {"step_s": max(t_all - t_one, 1e-9) / (n_tokens - 1)}


# ---------------------------------------------------------------- measuring one model


def load_runtimes(bench_model: BenchModel, threads: int):
    """(edge models per dtype, PyTorch fp32 eager model), both limited to ``threads`` CPU threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge.model import EdgeModel

    torch.set_num_threads(threads)  # same intra-op thread count as ORT: a fair fight on the same cores
    edge = {
        dtype: EdgeModel(folder, providers="cpu", threads=threads)
        for dtype, folder in bench_model.onnx_dirs.items()
    }
    torch_model = AutoModelForCausalLM.from_pretrained(str(bench_model.hf_dir), dtype=torch.float32).eval()
    return edge, torch_model


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(name: str, dtype: str, onnx_runs: list[dict], torch_runs: list[dict]) -> dict:
    """One table row from the per-repeat runs: medians, and the speedup as the ratio of median tokens/s."""
    onnx_step, torch_step = _median(onnx_runs, "step_s"), _median(torch_runs, "step_s")  # seconds
    forward = _median(onnx_runs, "forward_s")  # seconds per step
    return {
        "model": name,
        "dtype": dtype,
        "torch_dtype": "fp32",
        "onnx_tok_s": 1.0 / onnx_step,
        "torch_tok_s": 1.0 / torch_step,
        "speedup": torch_step / onnx_step,
        "loop_overhead": _median(onnx_runs, "loop_overhead"),
        "forward_ms_per_token": forward * 1e3,
        "other_ms_per_token": max(onnx_step - forward, 0.0) * 1e3,
        "torch_ms_per_token": torch_step * 1e3,
    }


def _skipped_rows(bench_model: BenchModel) -> list[dict]:
    """One row per dtype that has no export to time, saying why."""
    return [
        {"model": bench_model.name, "dtype": dtype, "skipped": why}
        for dtype, why in bench_model.skipped.items()
    ]


def _warm_up(edge: dict, torch_model, prompt_ids: list[int], input_ids, n_tokens: int) -> None:
    """One untimed run of every variant: first runs pay for allocations and lazy initialization."""
    for dtype in edge:
        onnx_decode_run(edge[dtype], prompt_ids, n_tokens)
    torch_decode_run(torch_model, input_ids, n_tokens)


def _interleaved_repeats(
    name: str, edge: dict, torch_model, prompt_ids: list[int], input_ids, n_tokens: int, repeats: int
) -> tuple[dict[str, list[dict]], list[dict]]:
    """({dtype: [onnx run per repeat]}, [torch run per repeat]), every variant once per repeat in turn."""
    from tqdm import tqdm

    onnx_runs: dict[str, list[dict]] = {dtype: [] for dtype in edge}
    torch_runs: list[dict] = []
    bar = tqdm(range(repeats), desc=f"{name} decode", unit="repeat", leave=False)
    for _ in bar:
        for dtype in edge:
            onnx_runs[dtype].append(onnx_decode_run(edge[dtype], prompt_ids, n_tokens))
        torch_runs.append(torch_decode_run(torch_model, input_ids, n_tokens))
    return onnx_runs, torch_runs


def measure_model(bench_model: BenchModel, repeats: int, n_tokens: int, threads: int) -> list[dict]:
    """Rows (one per ONNX dtype) for ``bench_model``: interleaved repeats, one untimed warm-up each."""
    import torch

    if n_tokens < 2:
        raise ValueError("need at least 2 new tokens: decode time is a difference over N - 1 steps")
    skipped = _skipped_rows(bench_model)
    if not bench_model.onnx_dirs:
        return skipped
    edge, torch_model = load_runtimes(bench_model, threads)
    prompt_ids = next(iter(edge.values())).encode(PROMPT)  # list[int], prompt length P
    input_ids = torch.tensor([prompt_ids])  # int64 (1, P)
    _warm_up(edge, torch_model, prompt_ids, input_ids, n_tokens)
    onnx_runs, torch_runs = _interleaved_repeats(
        bench_model.name, edge, torch_model, prompt_ids, input_ids, n_tokens, repeats
    )
    params = sum(p.numel() for p in torch_model.parameters())
    rows = [summarize(bench_model.name, dtype, runs, torch_runs) for dtype, runs in onnx_runs.items()]
    for row in rows:
        row["params_m"] = params / 1e6  # millions of parameters
    return rows + skipped


def machine_state() -> dict:
    """CPU count, load and library versions: a busy machine depresses (and skews) every number."""
    import onnxruntime
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }

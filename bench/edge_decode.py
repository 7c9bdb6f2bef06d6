"""The ``edge`` section of reports/bench.json: decode tokens/s of the ONNX Runtime edge loop vs PyTorch
eager ``generate`` on CPU, for every model, with the headline row judged against the issue's goals.

This module only orchestrates and assembles: the models come from ``bench.decode_models``, the
measurements (and how a decode step is timed) from ``bench.decode_timing``; ``bench.report`` writes the
section and prints it.
"""

from __future__ import annotations

from bench.decode_models import BenchModel
from bench.decode_timing import PROMPT, machine_state, measure_model

HEADLINE = ("llama-50m", "fp32")  # the (model, dtype) row behind edge.onnx_tok_s & co.
GOAL_SPEEDUP = 2.5  # onnx tok/s over torch tok/s
GOAL_LOOP_OVERHEAD = 0.10  # share of the edge decode step outside ORT forward
METHOD = (
    "median over interleaved repeats; decode step = (t(N)-t(1))/(N-1) for torch, "
    "decode_seconds/(N-1) for onnx; prefill excluded; greedy; CPU"
)


def goals(row: dict) -> dict:
    """Which of the issue's goals the headline row meets (as measured; nothing rounded in its favour)."""
    return {
        "speedup_ge_2.5": row["speedup"] >= GOAL_SPEEDUP,
        "loop_overhead_le_0.10": row["loop_overhead"] <= GOAL_LOOP_OVERHEAD,
    }


def headline_row(rows: list[dict], headline: tuple[str, str] = HEADLINE) -> dict:
    """The measured row for ``headline`` (model, dtype), else the first measured row."""
    measured = [r for r in rows if "skipped" not in r]
    if not measured:
        raise RuntimeError("no (model, dtype) could be measured: " + "; ".join(r["skipped"] for r in rows))
    return next((r for r in measured if (r["model"], r["dtype"]) == headline), measured[0])


def edge_section(
    rows: list[dict],
    command: str,
    threads: int,
    repeats: int,
    n_tokens: int,
    headline: tuple[str, str] = HEADLINE,
) -> dict:
    """The ``edge`` section of bench.json: the headline row's four keys, then every row in ``details``."""
    head = headline_row(rows, headline)
    return {
        "onnx_tok_s": head["onnx_tok_s"],
        "torch_tok_s": head["torch_tok_s"],
        "speedup": head["speedup"],
        "loop_overhead": head["loop_overhead"],
        "headline": {"model": head["model"], "dtype": head["dtype"]},
        "goals": goals(head),
        "details": rows,
        "command": command,
        "threads": threads,
        "repeats": repeats,
        "new_tokens": n_tokens,
        "prompt": PROMPT,
        "method": METHOD,
    }


def run(
    models: list[BenchModel],
    repeats: int,
    n_tokens: int,
    threads: int,
    command: str,
    headline: tuple[str, str] = HEADLINE,
) -> dict:
    """Measure every model and return the ``edge`` section (not yet written anywhere)."""
    before = machine_state()  # the load *before* we add ours: what other jobs were doing
    rows = [row for model in models for row in measure_model(model, repeats, n_tokens, threads)]
    section = edge_section(rows, command, threads, repeats, n_tokens, headline)
    section["machine"] = before
    return section

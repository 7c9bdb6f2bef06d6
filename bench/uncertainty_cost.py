"""Cost of each uncertainty estimator per token, as a share of the edge's decode step (goal <= 5%).

Measured on real logits (the model's prefill of the benchmark prompt), against the decode step time
the edge benchmark measured in the same run.
"""

from __future__ import annotations

from edge.uncertainty import ESTIMATORS, estimator_cost

GOAL_SHARE = 0.05


def measure(bench_models, edge_section: dict, threads: int) -> dict:
    """{model: {estimator: {"us": median µs per call, "share_of_step": cost / decode step}}} (fp32 rows)."""
    from bench.decode_timing import PROMPT
    from edge.model import EdgeModel

    steps = {r["model"]: (r["forward_ms_per_token"] + r["other_ms_per_token"]) / 1e3
             for r in edge_section["details"] if r.get("dtype") == "fp32" and "forward_ms_per_token" in r}
    out = {}
    for bm in bench_models:
        if bm.name not in steps or "fp32" not in bm.onnx_dirs:
            continue
        model = EdgeModel(bm.onnx_dirs["fp32"], providers="cpu", threads=threads)
        logits = model.runtime.prefill(model.encode(PROMPT))
        out[bm.name] = {}
        for name in ESTIMATORS:
            cost = estimator_cost(name, logits)
            out[bm.name][name] = {"us": cost * 1e6, "share_of_step": cost / steps[bm.name]}
    return out


def format_table(costs: dict) -> str:
    lines = [f"\nuncertainty cost per token (goal <= {GOAL_SHARE:.0%} of a decode step)"]
    for model, rows in costs.items():
        cells = ", ".join(f"{n} {r['us']:.0f} µs ({r['share_of_step']:.1%})" for n, r in rows.items())
        lines.append(f"  {model}: {cells}")
    return "\n".join(lines)

"""Quality section of `make bench`: the lowest transmission rate (and its uplink bytes per token) at which
the hybrid keeps >= 99% of LLM-only accuracy on the held-out demo problems, for this project's default
(draft-independent estimator, adaptive codec) and for the U-HLM configuration (K=20 perturbation vs the
draft, full32), measured in one sweep through the real verifier (configs/bench_frontier.json).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from eval.sweep import load_config, lowest_tr_at

CONFIG = Path("configs/bench_frontier.json")
OUT = Path("reports/bench_frontier")
CURVES = {"": ("max-prob", "adaptive"), "uhlm_": ("uhlm", "full32"), "cuhlm_": ("uhlm", "topk")}


def run(config_path: Path = CONFIG, out: Path = OUT) -> dict:
    """A fresh sweep (no stale points from older code), then the figures per temperature."""
    from core.process import VerifierProcess
    from edge.client import connect
    from edge.model import EdgeModel
    from core.sampling import SamplingSettings
    from eval.sweep import run_sweep
    from eval.taskeval import Runner

    config = load_config(config_path)
    shutil.rmtree(out, ignore_errors=True)
    model = EdgeModel(config.model, providers="auto")
    with VerifierProcess(config.verifier_model) as verifier:
        channel = connect(verifier.address)
        rows = run_sweep(config, out, Runner(model, channel, SamplingSettings(), config.seed))
        channel.close()
    section = {"config": str(config_path), "problems": config.problems, "by_temperature": {}}
    for temp in config.temperatures:
        figures = {}
        for prefix, (estimator, codec) in CURVES.items():
            best = lowest_tr_at(rows, estimator, codec, temp)
            figures[f"{prefix}tr_at_99"] = float(best["transmission_rate"]) if best else None
            figures[f"{prefix}bytes_per_token_at_99"] = float(best["uplink_bytes_per_token"]) if best else None
            figures[f"{prefix}u_th_at_99"] = float(best["u_th"]) if best else None
        section["by_temperature"][f"T{temp:g}"] = figures
    headline = section["by_temperature"][f"T{config.temperatures[-1]:g}"]
    section.update({k: v for k, v in headline.items() if not k.endswith("u_th_at_99")})
    section["headline_temperature"] = config.temperatures[-1]
    return section


def format_table(section: dict) -> str:
    lines = ["\nquality: lowest transmission rate with accuracy >= 99% of LLM-only (held-out demo problems)"]
    for temp, f in section["by_temperature"].items():
        for prefix, (est, codec) in CURVES.items():
            tr, b = f[f"{prefix}tr_at_99"], f[f"{prefix}bytes_per_token_at_99"]
            shown = "not reached" if tr is None else f"TR {tr:.3f}, {b:.1f} B/token"
            lines.append(f"  {temp} {est}+{codec}: {shown}")
    return "\n".join(lines)

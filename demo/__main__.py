"""`python -m demo`: export the demo SLM if needed, run it on held-out problems, print and save a table.

For now the edge runs SLM-only (the hybrid configurations join when the verifier exists). Writes
``reports/demo.json`` as ``{"rows": [{"config": ..., "accuracy": ..., ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from edge.generate import generate_local
from edge.model import EdgeModel
from edge.sampling import SamplingSettings
from models.demo_pair import COMMITTED_PAIR
from models.task import held_out_problems, is_correct

BUILD = Path("build/demo")
REPORT = Path("reports/demo.json")


def ensure_export(source: Path, out: Path) -> Path:
    """Export ``source`` to ONNX unless an export of it already exists (and is newer than its weights)."""
    manifest = out / "manifest.json"
    weights = source / "model.safetensors"
    if manifest.is_file() and manifest.stat().st_mtime >= weights.stat().st_mtime:
        return out
    from models.export import export_model  # torch/optimum only when an export is really needed

    print(f"exporting {source} -> {out} (ONNX, optimum) ...")
    export_model(str(source), out)
    return out


def run_slm_only(model: EdgeModel, n: int, settings: SamplingSettings, seed: int) -> dict:
    problems = held_out_problems(n)
    correct, tokens, decode_s = 0, 0, 0.0
    t0 = time.perf_counter()
    for i, problem in enumerate(tqdm(problems, desc="slm-only", unit="problem")):
        result = generate_local(model, model.encode(problem.prompt), 48, settings, seed=seed + i)
        correct += is_correct(problem, result.text)
        tokens += len(result.token_ids)
        decode_s += result.decode_seconds
    wall = time.perf_counter() - t0
    return {
        "config": "slm-only",
        "accuracy": correct / n,
        "retention": None,  # needs LLM-only, which arrives with the verifier
        "transmission_rate": 0.0,
        "acceptance_rate": None,
        "uplink_bytes_per_token": 0.0,
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": tokens / decode_s,
        "problems": n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--problems", type=int, default=200, help="held-out problems to run")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    slm_dir = ensure_export(COMMITTED_PAIR / "slm", BUILD / "slm-onnx")
    model = EdgeModel(slm_dir, providers="auto")
    example = held_out_problems(1)[0]
    sample = generate_local(model, model.encode(example.prompt), 48, SamplingSettings(0.0))
    print(f"example: {example.prompt}{sample.text}   (correct: {example.answer})")
    rows = [run_slm_only(model, args.problems, SamplingSettings(args.temperature), args.seed)]
    print(f"\n{'config':<10} {'accuracy':>9} {'TR':>6} {'uplink B/tok':>13} {'tok/s':>8}   providers={model.runtime.providers}")
    for r in rows:
        print(f"{r['config']:<10} {r['accuracy']:>9.3f} {r['transmission_rate']:>6.2f} "
              f"{r['uplink_bytes_per_token']:>13.1f} {r['tokens_per_s']:>8.1f}")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

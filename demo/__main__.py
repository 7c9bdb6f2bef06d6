"""`python -m demo` (`make demo`): the hybrid system end to end on the committed demo pair.

1. Export the demo SLM to ONNX (optimum) unless already exported.
2. Start the verifier (`python -m cloud serve`, the demo LLM) on a free loopback port.
3. Calibrate thresholds on training-split problems (verify-all, the verifier reports q(x)).
4. Run the held-out problems under six configurations of the same code: slm-only, llm-only (the
   verifier generates), hlm (verify all, full32), u-hlm (K=20 perturbation vs the draft, full32, its
   risk-averse threshold), cu-hlm (same estimator, top-30 with 8-bit probabilities) and default (this
   project's draft-independent estimator, adaptive codec, empirically chosen threshold).
5. Print one table and write ``reports/demo.json``; stop the server.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


from cloud.launch import VerifierProcess
from edge.calibration import estimator_data, fit_estimators
from edge.client import connect
from edge.hybrid import HybridConfig
from edge.model import EdgeModel
from edge.sampling import SamplingSettings
from edge.taskeval import Runner, summarize
from edge.uncertainty import DEFAULT_ESTIMATOR
from models.demo_pair import COMMITTED_PAIR
from proto.codec import CodecSpec
from models.task import MAX_SOLUTION_TOKENS, held_out_problems, sample_problems

BUILD = Path("build/demo")
REPORT = Path("reports/demo.json")
REJECTION_TARGET = 0.005  # default threshold: skipped tokens' mean rejection probability stays below this


def ensure_export(source: Path, out: Path) -> Path:
    """Export ``source`` to ONNX unless an export of it already exists (and is newer than its weights)."""
    manifest = out / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime >= (source / "model.safetensors").stat().st_mtime:
        return out
    from models.export import export_model  # torch/optimum only when an export is really needed

    print(f"exporting {source} -> {out} (ONNX via optimum) ...")
    export_model(str(source), out)
    return out


def calibrate(runner: Runner, n: int) -> dict:
    """Verify-all on training-split problems; per estimator, the line fit and thresholds."""
    config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("full32"), settings=runner.settings,
                          max_new_tokens=MAX_SOLUTION_TOKENS, record_all_estimators=True)
    rows = runner.hybrid("calibration", config, sample_problems(n, "train", seed=777), report_q=True)
    b, us = estimator_data([r for _, res in rows for r in res.records])
    return fit_estimators(b, us, target=REJECTION_TARGET, tolerated=0.1)


def print_table(rows: list[dict], thresholds: dict) -> None:
    head = f"{'config':<10} {'accuracy':>8} {'retention':>9} {'TR':>6} {'accept':>7} {'uplink B/tok':>12} {'tok/s':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        print(f"{r['config']:<10} {r['accuracy']:>8.3f} {r['retention']:>9.3f} {r['transmission_rate']:>6.3f} "
              f"{acc:>7} {r['uplink_bytes_per_token']:>12.1f} {r['tokens_per_s']:>7.1f}")
    print("thresholds: " + ", ".join(f"{k}={v:.4g}" for k, v in thresholds.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per configuration")
    parser.add_argument("--calibration-problems", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPORT, help="where the table is written as JSON")
    args = parser.parse_args(argv)

    model = EdgeModel(ensure_export(COMMITTED_PAIR / "slm", BUILD / "slm-onnx"), providers="auto")
    settings = SamplingSettings(temperature=args.temperature)
    problems = held_out_problems(args.problems)
    print(f"edge providers: {model.runtime.providers}; starting the verifier ...")
    with VerifierProcess(str(COMMITTED_PAIR / "llm")) as verifier:
        channel = connect(verifier.address)
        runner = Runner(model, channel, settings, args.seed)
        cal = calibrate(runner, args.calibration_problems)
        u_hlm_th = cal["uhlm"]["averse"]
        default_th = cal[DEFAULT_ESTIMATOR]["empirical"]
        base = HybridConfig(settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
        configs = {
            "slm-only": (replace(base, threshold=float("inf"), codec=CodecSpec("full32")), False),
            "hlm": (replace(base, threshold=float("-inf"), codec=CodecSpec("full32")), True),
            "u-hlm": (replace(base, threshold=u_hlm_th, estimator="uhlm", codec=CodecSpec("full32")), True),
            "cu-hlm": (replace(base, threshold=u_hlm_th, estimator="uhlm", codec=CodecSpec("topk")), True),
            "default": (replace(base, threshold=default_th, estimator=DEFAULT_ESTIMATOR, codec=CodecSpec("adaptive")),
                        True),
        }
        table = [runner.llm_only(problems)]
        for name, (config, verify) in configs.items():
            table.append(summarize(name, runner.hybrid(name, config, problems, verify=verify)))
        channel.close()
    llm_acc = table[0]["accuracy"]
    for row in table:
        row["retention"] = row["accuracy"] / llm_acc if llm_acc else 0.0
    order = ["slm-only", "llm-only", "hlm", "u-hlm", "cu-hlm", "default"]
    table.sort(key=lambda r: order.index(r["config"]))
    print_table(table, {"u-hlm/cu-hlm (uhlm, risk-averse)": u_hlm_th, f"default ({DEFAULT_ESTIMATOR})": default_th})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": table, "problems": args.problems, "temperature": args.temperature,
                                  "calibration": cal, "seed": args.seed}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

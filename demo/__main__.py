"""`python -m demo` (`make demo`): the hybrid system end to end on the committed demo pair.

1. Export the demo SLM to ONNX (optimum) unless already exported.
2. Start the verifier (`python -m cloud serve`, the demo LLM) on a free loopback port.
3. Calibrate thresholds on training-split problems (verify-all, the verifier reports q(x)).
4. Run the held-out problems under every policy of ``eval/policies.py`` that runs the demo SLM, configurations
   of the same code: slm-only, llm-only (the verifier generates), hlm (verify all, full32), u-hlm and cu-hlm
   (U-HLM's draft-dependent estimator; inexact), default (this project's draft-independent estimator, adaptive
   codec, empirically chosen threshold), default-pipelined (default drafting up to 16 tokens past the oldest
   unresolved Verify: the same tokens; on loopback the round trip it hides is short, see ``make bench``'s
   pipeline section for a shaped link) and the span and step modes. Policies that need an edge model of their
   own (span-learned) are listed, not run: ``python -m eval modes`` builds and measures them.
5. Print one table and write ``reports/demo.json``; stop the server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.process import VerifierProcess
from core.sampling import SamplingSettings
from edge.client import connect
from edge.model import EdgeModel
from eval.pair import LLM_DIR, calibrate, ensure_export
from eval.policies import POLICIES, on_slm
from eval.taskeval import Runner
from models.task import held_out_problems

REPORT = Path("reports/demo.json")
DEMO_POLICIES = on_slm("demo")  # every policy that runs the committed demo SLM


def pipelined_notes(rows: list[dict]) -> list[str]:
    """For each pipelined row: its tokens/s over its stop-and-wait base's and whether the tokens were the same."""
    by_name = {r["config"]: r for r in rows}
    notes = []
    for r in rows:
        base = by_name.get(r["config"].removesuffix("-pipelined"))
        if not r.get("lookahead") or base is None or base is r:
            continue
        same = r.get("tokens_digest") is not None and r.get("tokens_digest") == base.get("tokens_digest")
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        notes.append(f"{r['config']} (lookahead {r['lookahead']}): {ratio:.2f}x {base['config']}'s tokens/s on "
                     f"loopback (no network delay to hide, only the verifier's time), same tokens: "
                     f"{'yes' if same else 'NO'}")
    return notes


def print_table(rows: list[dict], thresholds: dict) -> None:
    width = max(len("config"), *(len(r["config"]) for r in rows))
    head = (f"{'config':<{width}} {'accuracy':>8} {'retention':>9} {'TR':>6} {'accept':>7} {'uplink B/tok':>12} "
            f"{'tok/s':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        print(f"{r['config']:<{width}} {r['accuracy']:>8.3f} {r['retention']:>9.3f} {r['transmission_rate']:>6.3f} "
              f"{acc:>7} {r['uplink_bytes_per_token']:>12.1f} {r['tokens_per_s']:>7.1f}")
    for note in pipelined_notes(rows):
        print(note)
    print("thresholds: " + ", ".join(f"{k}={v:.4g}" for k, v in thresholds.items()))
    inexact = [p.name for p in DEMO_POLICIES.values() if not p.exact]
    print(f"inexact by design (the send rule looks at the drawn draft, or unverified SLM text is kept): "
          f"{', '.join(inexact)}")
    others = [name for name in POLICIES if name not in DEMO_POLICIES]
    print(f"not run here (they need an edge model of their own; python -m eval modes builds and measures them): "
          f"{', '.join(others)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per configuration")
    parser.add_argument("--calibration-problems", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPORT, help="where the table is written as JSON")
    args = parser.parse_args(argv)

    model = EdgeModel(ensure_export(), providers="auto")
    settings = SamplingSettings(temperature=args.temperature)
    problems = held_out_problems(args.problems)
    print(f"edge providers: {model.runtime.providers}; starting the verifier ...")
    with VerifierProcess(str(LLM_DIR)) as verifier:
        channel = connect(verifier.address)
        runner = Runner(model, channel, settings, args.seed)
        cal = calibrate(runner, args.calibration_problems)
        # llm-only first, as before: the verifier's state (and so the timing) seen by each row is unchanged
        order = ["llm-only", *(name for name in DEMO_POLICIES if name != "llm-only")]
        rows = {name: runner.policy(POLICIES[name], problems, POLICIES[name].threshold_from(cal)) for name in order}
        channel.close()
    table = [rows[name] for name in DEMO_POLICIES]
    llm_acc = rows["llm-only"]["accuracy"]
    for row in table:
        row.pop("correct", None)  # per-problem correctness: the modes table's paired intervals use it, not the demo
        row["retention"] = row["accuracy"] / llm_acc if llm_acc else 0.0
        row["exact"] = POLICIES[row["config"]].exact
        row["lookahead"] = POLICIES[row["config"]].lookahead
    thresholds = {f"{p.name} ({p.estimator}, {p.threshold})": p.threshold_from(cal)
                  for p in DEMO_POLICIES.values() if p.calibrated and not p.lookahead}  # a pipelined one shares its base's
    print_table(table, thresholds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": table, "problems": args.problems, "temperature": args.temperature,
                                  "calibration": cal, "seed": args.seed}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

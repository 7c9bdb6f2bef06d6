"""Command line of `python -m simulate`: run, sweep, record, validate, modes.

Every argument and config field is validated; a user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from core.cli import OneLineParser, UserError, non_negative_float, positive_int, run_cli
from simulate.config import ConfigError
from simulate.testbed.edge_run import TESTBED_POLICIES
from simulate.trace import TraceError


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated finite numbers >= 0, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts) or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated distinct integers >= 0, got {text!r}")
    return [int(x) for x in parts]


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _run(args) -> int:
    from simulate.config import load_config
    from simulate.study import run_one

    metrics = run_one(load_config(args.config))
    text = json.dumps(metrics, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _sweep(args) -> int:
    from simulate.config import load_config
    from simulate.study import run_sweep

    summary = run_sweep(load_config(args.config), args.out)
    print(f"{len(summary['rows'])} points; wrote {args.out}/sweep.csv, summary.json and plots")
    return 0


def _record(args) -> int:
    from simulate.testbed.record import record_all

    manifest = record_all(args.out, args.problems, args.calibration_problems, args.seed, args.temperature,
                          args.extra_thresholds, coarse=args.coarse)
    for name, p in manifest["policies"].items():
        print(f"{name:<16} accuracy {p['accuracy']:.3f}  threshold {p['threshold']}  {p['file']}")
    return 0


def _modes(args) -> int:
    """Fill ``sim_tokens_per_s`` of a modes table (``python -m eval modes`` output, or a bench report's section)."""
    from simulate.modes import fill_rows, format_table, trace_path

    try:
        data = json.loads(args.modes.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the modes table {args.modes}: {exc}") from None
    section = data["modes"] if isinstance(data, dict) and "rows" not in data and "modes" in data else data
    if not isinstance(section, dict) or not isinstance(section.get("rows"), list):
        raise UserError(f"{args.modes} holds no modes table (python -m eval modes writes one)")
    missing = [r for r in section["rows"] if args.rerecord or not trace_path(args.traces, r).is_file()]
    if missing:
        _record_modes(missing, args)
    fill_rows(section, args.traces)
    args.modes.write_text(json.dumps(data, indent=2) + "\n")
    print(format_table(section))
    print(f"wrote {args.modes}")
    return 0


def _record_modes(rows: list[dict], args) -> None:
    """Record the rows' traces on the first ``--problems`` held-out problems against a local verifier."""
    from eval.modes import modes_runners
    from models.task import held_out_problems
    from simulate.modes import record_rows

    with modes_runners(threads=1, seed=args.seed) as runner_for:
        record_rows(rows, runner_for, held_out_problems(args.problems), args.traces)


def _validate(args) -> int:
    from simulate.testbed.validate import main_validate

    return main_validate(args)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m simulate", description="Trace-driven network simulator.")
    sub = parser.add_subparsers()
    p = sub.add_parser("run", help="simulate one configuration, print its metrics as JSON")
    p.add_argument("--config", type=Path, required=True, help="simulator config (JSON), see simulate/config.py")
    p.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    p.set_defaults(func=_run)
    p = sub.add_parser("sweep", help="bandwidth x RTT x devices x policy sweep: CSV, summary.json, PNG plots")
    p.add_argument("--config", type=Path, required=True, help="simulator config with a 'sweep' section")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("record", help="record one real trace per policy from the demo pair (real verifier)")
    p.add_argument("--out", type=Path, default=Path("reports/sim/traces"))
    p.add_argument("--problems", type=positive_int, default=40, help="held-out problems per policy")
    p.add_argument("--calibration-problems", type=positive_int, default=60)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--extra-thresholds", type=_float_list, default=[0.06, 0.2],
                   help="comma-separated extra thresholds for the default policy (default@U traces)")
    p.add_argument("--coarse", action="store_true", help="also the span and step modes (route coarse)")
    p.set_defaults(func=_record)
    p = sub.add_parser("modes", help="fill sim_tokens_per_s of a modes table: each row's mode recorded on a few "
                                     "problems and replayed at 10 Mbit/s, 50 ms RTT, one device")
    p.add_argument("--modes", type=Path, default=Path("reports/modes.json"),
                   help="the table (python -m eval modes output, or a bench report with a 'modes' section); "
                        "rewritten with the figures")
    p.add_argument("--traces", type=Path, default=Path("reports/sim/modes_traces"),
                   help="one trace per row (MODE@T<temperature>.jsonl); missing ones are recorded (demo pair, "
                        "a local verifier)")
    p.add_argument("--problems", type=positive_int, default=20, help="held-out problems recorded per row")
    p.add_argument("--seed", type=_seed, default=0, help="the table's seed (python -m eval modes --seed)")
    p.add_argument("--rerecord", action="store_true", help="record every row again, not only the missing ones")
    p.set_defaults(func=_modes)
    p = sub.add_parser("validate", help="real edge + verifier in two network namespaces over a shaped veth "
                                        "vs the simulator (root)")
    p.add_argument("--out", type=Path, default=Path("reports/sim/validation"))
    p.add_argument("--problems", type=positive_int, default=4, help="problems per point")
    p.add_argument("--policy", choices=TESTBED_POLICIES, default="hlm")
    p.add_argument("--rates-mbit", type=_float_list, default=[5.0, 20.0, 100.0],
                   help="comma-separated uplink rates in Mbit/s (at least one should be the bottleneck)")
    p.add_argument("--rtt-ms", type=_float_list, default=[20.0],
                   help="comma-separated round-trip propagation delays added by the relay (ms)")
    p.add_argument("--lookahead", type=_int_list, default=[0],
                   help="comma-separated lookaheads of the edge (0 = stop-and-wait; N > 0 pipelines, protocol v2)")
    p.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, user_errors=(ConfigError, TraceError, UserError))

"""Command line of `python -m simulate`: run, sweep, record, validate.

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
                          args.extra_thresholds)
    for name, p in manifest["policies"].items():
        print(f"{name:<16} accuracy {p['accuracy']:.3f}  threshold {p['threshold']}  {p['file']}")
    return 0


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
    p.set_defaults(func=_record)
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

"""The real edge for the testbed: run held-out problems through one policy, timing each one.

Started inside the edge namespace by ``simulate/testbed/validate.py`` and by ``make bench``'s pipeline
section (``bench/pipeline.py``). Writes the edge's own trace (the simulator's input) and, per generation,
the wall time of the whole ``generate_hybrid`` call (Open handshake included: the trace's ``seconds``
starts after it), its token ids and what the pipeline wasted (rolled-back drafts, stale Verifies and their
uplink bytes). ``--lookahead N`` drafts up to N tokens past the oldest unresolved Verify (protocol v2;
0 = stop-and-wait; default: the policy's own). ``--policy slm-only`` runs the SLM alone (no ``--verifier``).

Comparing variants on a shared machine: ``--lookahead 0,4,16`` (several values) and/or ``--with-slm-only``
run every problem under each variant in turn, in one process (the order rotating from problem to problem),
so a load change hits all of them alike; each variant gets its own trace (``TRACE`` with ``.la4``,
``.slm-only``, ... before the suffix) and the timing file holds them under ``variants``.

    python -m simulate.testbed.edge_run --model build/demo/slm-onnx --verifier 10.203.0.2:7000 --policy hlm \\
        --problems 4 --trace t.jsonl --timing t.json [--lookahead 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from core.cli import non_negative_int
from edge.hybrid import DEFAULT_THRESHOLD
from eval.policies import HYBRID, POLICIES

TESTBED_POLICIES = tuple(name for name, p in POLICIES.items() if p.route == HYBRID)  # `simulate validate`'s
SLM_ONLY = "slm-only"


def lookaheads(text: str) -> list[int]:
    """``N`` or ``N,M,...``: each an integer >= 0, no repeats."""
    values = [non_negative_int(part) for part in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"repeated lookahead in {text}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulate.testbed.edge_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--verifier", help="HOST:PORT (required unless the policy is slm-only)")
    parser.add_argument("--policy", choices=(*TESTBED_POLICIES, SLM_ONLY), default="hlm")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="u_th for calibrated policies (a fixed-threshold policy such as hlm keeps its own)")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="generations run first and not recorded (connection, HTTP/2 window, verifier warm-up)")
    parser.add_argument("--lookahead", type=lookaheads, default=None, metavar="N[,N...]",
                        help="tokens drafted past the oldest unresolved Verify (0 = stop-and-wait; default: the "
                             "policy's own, 0 except for default-pipelined); several values: interleaved variants")
    parser.add_argument("--with-slm-only", action="store_true",
                        help="also run every problem SLM-only (policy slm-only), interleaved with the others")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="ORT intra-op threads (0 = ORT default)")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--timing", required=True)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if POLICIES[args.policy].route == HYBRID and not args.verifier:
        parser.error(f"--verifier is required for policy {args.policy}")
    return args


def hybrid_config(args: argparse.Namespace, lookahead: int | None = None):
    """(policy, threshold, HybridConfig) for ``args`` (at ``lookahead``, else the first of ``--lookahead``,
    else the policy's own)."""
    from core.sampling import SamplingSettings

    policy = POLICIES[args.policy]
    threshold = args.threshold if policy.calibrated else policy.threshold_from(None)
    config = policy.config(SamplingSettings(temperature=1.0), threshold)
    if lookahead is None and args.lookahead:
        lookahead = args.lookahead[0]
    return policy, threshold, config if lookahead is None else replace(config, lookahead=lookahead)


def _timing(runs, policy: str, threshold: float, lookahead: int, threads: int) -> dict:
    return {"walls_s": [r.wall_s for r in runs], "tokens": [len(r.result.token_ids) for r in runs],
            "policy": policy, "threshold": str(threshold), "lookahead": lookahead, "threads": threads,
            "token_ids": [r.result.token_ids for r in runs], "round_trips": [r.result.round_trips for r in runs],
            "rolled_back": [len(r.result.rolled_back) for r in runs],
            "stale_verifies": [r.result.stale_verifies for r in runs],
            "stale_uplink_bytes": [r.result.stale_uplink_bytes for r in runs],
            "uplink_bytes": [r.result.uplink_bytes for r in runs]}


def variant_trace(trace: str, label: str) -> Path:
    """Where an interleaved variant's trace goes: ``t.jsonl`` -> ``t.la4.jsonl``."""
    path = Path(trace)
    return path.with_name(f"{path.stem}.{label}{path.suffix}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from edge.client import connect
    from edge.model import EdgeModel
    from edge.transport import Transport
    from eval.taskeval import Runner
    from models.task import held_out_problems

    model = EdgeModel(args.model, providers="cpu", threads=args.threads)
    policy, threshold, config = hybrid_config(args)
    verify = policy.route == HYBRID
    # the testbed's veth is a private emulated link between two namespaces: plaintext, said explicitly
    channel = connect(args.verifier, timeout=30, transport=Transport(insecure=True)) if verify else None
    runner = Runner(model, channel, config.settings, args.seed, timeout=120)
    problems = held_out_problems(args.warmup + args.problems)
    interleaved = args.with_slm_only or len(args.lookahead or []) > 1
    if not interleaved:
        runner.hybrid("warm-up", config, problems[:args.warmup], verify=verify, progress=False)
        with open(args.trace, "w") as out:
            runs = runner.hybrid(policy.name, config, problems[args.warmup:], verify=verify, trace=out,
                                 first_index=args.warmup, progress=False)
        timing = _timing(runs, args.policy, threshold, config.lookahead, args.threads)
    else:
        # label -> (policy name, threshold, config, verify): the same problems and seeds for every variant
        variants = {f"la{n}": (policy.name, threshold, hybrid_config(args, n)[2], verify)
                    for n in (args.lookahead or [config.lookahead])}
        if args.with_slm_only:
            slm = POLICIES[SLM_ONLY]
            variants[SLM_ONLY] = (SLM_ONLY, slm.threshold_from(None), slm.config(config.settings, float("inf")), False)
        for _, _, cfg, ver in variants.values():
            runner.hybrid("warm-up", cfg, problems[:args.warmup], verify=ver, progress=False)
        traces = {label: open(variant_trace(args.trace, label), "w") for label in variants}
        runs = {label: [] for label in variants}
        labels = list(variants)
        for i in range(args.warmup, len(problems)):
            start = i % len(labels)
            for label in labels[start:] + labels[:start]:  # the order rotates from problem to problem
                _, _, cfg, ver = variants[label]
                runs[label] += runner.hybrid(label, cfg, [problems[i]], verify=ver, trace=traces[label],
                                             first_index=i, progress=False)
        for f in traces.values():
            f.close()
        timing = {"interleaved": True, "variants": {
            label: {**_timing(runs[label], name, th, cfg.lookahead, args.threads),
                    "trace": str(variant_trace(args.trace, label))}
            for label, (name, th, cfg, _) in variants.items()}}
    if channel is not None:
        channel.close()
    with open(args.timing, "w") as f:
        json.dump(timing, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

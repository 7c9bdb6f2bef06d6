"""The real edge for the validation testbed: run held-out problems through one policy, timing each one.

Started by ``simulate/testbed/validate.py`` inside the edge namespace. Writes the edge's own trace (the
simulator's input) and, per generation, the wall time of the whole ``generate_hybrid`` call (Open
handshake included: the trace's ``seconds`` starts after it).

    python -m simulate.testbed.edge_run --model build/demo/slm-onnx --verifier 10.203.0.2:7000 --policy hlm \
        --problems 4 --trace t.jsonl --timing t.json
"""

from __future__ import annotations

import argparse
import json

from edge.hybrid import DEFAULT_THRESHOLD
from eval.policies import HYBRID, POLICIES

TESTBED_POLICIES = tuple(name for name, p in POLICIES.items() if p.route == HYBRID)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulate.testbed.edge_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--verifier", required=True, help="HOST:PORT")
    parser.add_argument("--policy", choices=TESTBED_POLICIES, default="hlm")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="u_th for calibrated policies (a fixed-threshold policy such as hlm keeps its own)")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="generations run first and not recorded (connection, HTTP/2 window, verifier warm-up)")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--timing", required=True)
    args = parser.parse_args(argv)

    from core.sampling import SamplingSettings
    from edge.client import connect
    from edge.model import EdgeModel
    from edge.transport import Transport
    from eval.taskeval import Runner
    from models.task import held_out_problems

    model = EdgeModel(args.model, providers="cpu")
    policy = POLICIES[args.policy]
    threshold = args.threshold if policy.calibrated else policy.threshold_from(None)
    config = policy.config(SamplingSettings(temperature=1.0), threshold)
    # the testbed's veth is a private emulated link between two namespaces: plaintext, said explicitly
    channel = connect(args.verifier, timeout=30, transport=Transport(insecure=True))
    runner = Runner(model, channel, config.settings, args.seed, timeout=120)
    problems = held_out_problems(args.warmup + args.problems)
    runner.hybrid("warm-up", config, problems[:args.warmup], progress=False)
    with open(args.trace, "w") as out:
        runs = runner.hybrid(policy.name, config, problems[args.warmup:], trace=out, first_index=args.warmup,
                             progress=False)
    channel.close()
    with open(args.timing, "w") as f:
        json.dump({"walls_s": [r.wall_s for r in runs], "tokens": [len(r.result.token_ids) for r in runs],
                   "policy": args.policy, "threshold": str(threshold)}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The real edge for the validation testbed: run held-out problems through one policy, timing each one.

Started by ``simulate/validate.py`` inside the edge namespace. Writes the edge's own trace (the
simulator's input) and, per generation, the wall time of the whole ``generate_hybrid`` call (Open
handshake included: the trace's ``seconds`` starts after it).

    python -m simulate.edge_run --model build/demo/slm-onnx --verifier 10.203.0.2:7000 --policy hlm \
        --problems 4 --trace t.jsonl --timing t.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

POLICIES = {"hlm": ("max-prob", "full32"), "u-hlm": ("uhlm", "full32"), "cu-hlm": ("uhlm", "topk"),
            "default": ("max-prob", "adaptive")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulate.edge_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--verifier", required=True, help="HOST:PORT")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="hlm")
    parser.add_argument("--threshold", type=float, default=0.06, help="u_th (ignored by hlm: verify all)")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="generations run first and not recorded (connection, HTTP/2 window, verifier warm-up)")
    parser.add_argument("--trace", required=True)
    parser.add_argument("--timing", required=True)
    args = parser.parse_args(argv)

    from edge.client import VerifierSession, connect
    from edge.hybrid import HybridConfig, generate_hybrid
    from edge.model import EdgeModel
    from edge.sampling import SamplingSettings
    from models.task import MAX_SOLUTION_TOKENS, held_out_problems
    from proto.codec import CodecSpec

    model = EdgeModel(args.model, providers="cpu")
    settings = SamplingSettings(temperature=1.0)
    estimator, codec = POLICIES[args.policy]
    threshold = -math.inf if args.policy == "hlm" else args.threshold
    config = replace(HybridConfig(settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS), threshold=threshold,
                     estimator=estimator, codec=CodecSpec(codec))
    from edge.transport import Transport

    # the testbed's veth is a private emulated link between two namespaces: plaintext, said explicitly
    channel = connect(args.verifier, timeout=30, transport=Transport(insecure=True))
    walls, tokens = [], []
    with open(args.trace, "w") as out:
        for i, problem in enumerate(held_out_problems(args.warmup + args.problems)):
            seed = args.seed + i
            warm = i < args.warmup

            def opener(prompt_ids, seed=seed):
                return VerifierSession(channel, model.manifest.fingerprint, prompt_ids, settings, config.codec,
                                       seed=seed, timeout=120)
            t0 = time.perf_counter()
            result = generate_hybrid(model, model.encode(problem.prompt), config, seed=seed, open_session=opener,
                                     trace=None if warm else out)
            if warm:
                continue
            walls.append(time.perf_counter() - t0)
            tokens.append(len(result.token_ids))
    channel.close()
    with open(args.timing, "w") as f:
        json.dump({"walls_s": walls, "tokens": tokens, "policy": args.policy, "threshold": str(threshold)}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

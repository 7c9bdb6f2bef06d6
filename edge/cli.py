"""Command line of `python -m edge`: generate text with the exported SLM (SLM-only for now)."""

from __future__ import annotations

import json

from edge.cli_errors import OneLineParser, non_negative_float, positive_int, run_cli
from edge.manifest import ModelFolderError
from edge.runtime import PROVIDER_ALIASES


def _generate(args) -> int:
    from edge.generate import generate_local
    from edge.model import EdgeModel
    from edge.sampling import SamplingSettings

    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model = EdgeModel(args.model, providers=args.provider, threads=args.threads)
    result = generate_local(model, model.encode(args.prompt), args.max_new_tokens, settings, seed=args.seed)
    print(args.prompt + result.text)
    summary = {
        "tokens": len(result.token_ids),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "prefill_ms": round(result.prefill_seconds * 1e3, 2),
        "loop_overhead": round(result.loop_overhead, 3),
        "providers": model.runtime.providers,
        "stopped_at_eos": result.stopped_at_eos,
    }
    print(json.dumps(summary) if args.json else "  ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m edge", description="Edge side: the ONNX SLM that drafts every token.")
    sub = parser.add_subparsers()
    p = sub.add_parser("generate", help="generate text with the exported SLM")
    p.add_argument("--model", required=True, help="ONNX export folder (from python -m models export)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=_unit_interval, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, user_errors=(ModelFolderError, ValueError))

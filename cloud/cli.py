"""Command line of `python -m cloud`: serve the verifier."""

from __future__ import annotations

import logging
from pathlib import Path

from edge.cli_errors import OneLineParser, UserError, run_cli


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _serve(args) -> int:
    from cloud.engine import VerifierModel
    from cloud.server import serve

    path = Path(args.model)
    if (path.exists() or args.model.startswith((".", "/"))) and not (path / "config.json").is_file():
        raise UserError(f"{args.model} is not a transformers model folder (no config.json) and not a hub id")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}')
    engine = VerifierModel(args.model, device=args.device, threads=args.threads)
    try:
        serve(engine, args.host, args.port)
    except OSError as exc:
        raise UserError(str(exc)) from None
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m cloud", description="Cloud side: the verifier service.")
    sub = parser.add_subparsers()
    p = sub.add_parser("serve", help="serve the verifier over gRPC")
    p.add_argument("--model", required=True, help="transformers folder or hub id of the large model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=_port, default=50051, help="0 = pick a free port (printed on start)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--verbose", action="store_true", help="log every session event (JSON lines on stderr)")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)

"""Command line of `python -m cloud`: serve the verifier, and issue device tokens."""

from __future__ import annotations

from pathlib import Path

from core.cli import (OneLineParser, UserError, non_negative_float, non_negative_int, port, positive_int, positive_seconds,
                      run_cli)
from core.process import METRICS_READY


def _check_model(model: str) -> None:
    path = Path(model)
    if (path.exists() or model.startswith((".", "/"))) and not (path / "config.json").is_file():
        raise UserError(f"{model} is not a transformers model folder (no config.json) and not a hub id")


def _security(args):
    """(server credentials or None, token store or None) from the TLS and token options."""
    from cloud.auth import TokenStore, server_credentials
    from proto.addresses import check_plaintext_allowed

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise UserError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        if credentials is None:
            check_plaintext_allowed(args.host, args.insecure, "verifier")
        tokens = TokenStore.load(args.tokens) if args.tokens else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return credentials, tokens


def _serve(args) -> int:
    _check_model(args.model)
    credentials, tokens = _security(args)
    from cloud import logs
    from cloud.engine import VerifierModel
    from cloud.metrics import VerifierMetrics, serve_metrics
    from cloud.server import ServerLimits, build_server, serve

    logs.configure(args.verbose)
    try:
        limits = ServerLimits(max_message_bytes=args.max_message_bytes, max_sessions=args.max_sessions,
                              max_context=args.max_context, idle_timeout_s=args.idle_timeout,
                              shutdown_grace_s=args.shutdown_grace, open_timeout_s=args.open_timeout,
                              max_pending_opens=args.max_pending_opens)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        engine = VerifierModel(args.model, device=args.device, threads=args.threads, batching=args.batching == "on",
                               max_batch_tokens=args.max_batch_tokens, kv_budget_mb=args.kv_budget_mb)
    except ValueError as exc:  # e.g. a model with fewer logit rows than its tokenizer's id space
        raise UserError(str(exc)) from None
    metrics = VerifierMetrics()
    try:
        built = build_server(engine, f"{args.host}:{args.port}", limits, metrics, credentials, tokens)
        if args.metrics_port is not None:
            bound = serve_metrics(metrics, args.metrics_host or args.host, args.metrics_port)
            print(f"{METRICS_READY}http://{args.metrics_host or args.host}:{bound}/metrics", flush=True)
        serve(built, args.host)
    except OSError as exc:
        raise UserError(str(exc)) from None
    return 0


def _add_token(args) -> int:
    from cloud.auth import METHODS, add_token

    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError(f"--methods: unknown {sorted(unknown)}; known: {','.join(METHODS)}")
    try:
        token = add_token(args.tokens, args.device, methods)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot update {args.tokens}: {exc}") from None
    print(token)  # shown once; the file keeps only its hash
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m cloud", description="Cloud side: the verifier service.")
    sub = parser.add_subparsers()
    p = sub.add_parser("serve", help="serve the verifier over gRPC")
    p.add_argument("--model", required=True, help="transformers folder or hub id of the large model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port, default=50051, help="0 = pick a free port (printed on start)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch intra-op threads (default 0 = the cores this process may use, i.e. its CPU affinity "
                        "capped by a cgroup quota, minus one for gRPC and sampling; torch's own default counts "
                        "every core of the host and oversubscribes a shared one)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--batching", choices=("on", "off"), default="on",
                        help="on: Verifies and Generate steps of all sessions that are ready together share one "
                             "forward (continuous batching); off: one forward per session, one at a time")
    engine.add_argument("--max-batch-tokens", type=positive_int, default=4096,
                        help="largest batched forward, in padded tokens (rows x longest new tail; default 4096)")
    engine.add_argument("--kv-budget-mb", type=non_negative_float, default=0.0,
                        help="memory for all sessions' KV caches; past it the least recently used idle caches are "
                             "dropped and rebuilt by prefill when their session resumes (default 0 = no budget)")
    p.add_argument("--verbose", action="store_true", help="log every session event (JSON lines on stderr)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-sessions", type=positive_int, default=64,
                        help="concurrent sessions; more are refused with RESOURCE_EXHAUSTED (default 64)")
    limits.add_argument("--max-context", type=positive_int, default=0,
                        help="tokens per session (default: the model's max_position_embeddings)")
    limits.add_argument("--max-message-bytes", type=positive_int, default=1 << 20,
                        help="largest message accepted (default 1 MiB; full32 at 152k entries needs 608 KB)")
    limits.add_argument("--idle-timeout", type=positive_seconds, default=60.0,
                        help="evict a session silent for this many seconds (default 60)")
    limits.add_argument("--open-timeout", type=positive_seconds, default=5.0,
                        help="a stream must send Open within this many seconds (default 5)")
    limits.add_argument("--max-pending-opens", type=positive_int, default=16,
                        help="streams that may be waiting to send Open at once; past it the oldest is evicted "
                             "(default 16)")
    limits.add_argument("--shutdown-grace", type=non_negative_float, default=10.0,
                        help="seconds in-flight calls get after SIGTERM (default 10)")
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", help="PEM server certificate (enables TLS)")
    sec.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sec.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    sec.add_argument("--tokens", help="tokens file: require a bearer token per device (python -m cloud add-token)")
    sec.add_argument("--insecure", action="store_true",
                     help="allow plaintext on a non-loopback --host (plaintext on loopback needs no flag)")
    sec.add_argument("--metrics-port", type=port, default=None,
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port; default off)")
    sec.add_argument("--metrics-host", help="address for the metrics endpoint (default --host)")
    p.set_defaults(func=_serve)
    t = sub.add_parser("add-token", help="create a bearer token for a device; prints it once")
    t.add_argument("--tokens", required=True, help="tokens file to create or update (only hashes are stored)")
    t.add_argument("--device", required=True, help="device name, e.g. jetson-01")
    t.add_argument("--methods", default="Session,Generate", help="comma-separated methods it may call")
    t.set_defaults(func=_add_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)

"""Command line of `python -m edge`: generate text with the exported SLM, alone or with a verifier."""

from __future__ import annotations

import json
import math

from core.cli import (OneLineParser, UserError, addresses, non_negative_float, non_negative_int, positive_int,
                      positive_seconds, run_cli, threshold, unit_interval)
from edge.calibration import load_calibration, threshold_for
from edge.hybrid import DEFAULT_THRESHOLD
from edge.manifest import ModelFolderError
from edge.runtime import PROVIDER_ALIASES
from edge.uncertainty import DEFAULT_ESTIMATOR, ESTIMATORS
from proto.distribution import CODEC_NAMES
from proto.fingerprint import pairing_key


def _local(args, model, settings, prompt: tuple[str, list[int]]) -> dict:
    from edge.generate import generate_local

    result = generate_local(model, prompt[1], args.max_new_tokens, settings, seed=args.seed)
    print(prompt[0] + result.text)
    return {"tokens": len(result.token_ids), "stopped": _stop_reason(result),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "prefill_ms": round(result.prefill_seconds * 1e3, 2), "loop_overhead": round(result.loop_overhead, 3)}


def _hybrid(args, model, settings, prompt: tuple[str, list[int]]) -> dict:
    from edge.client import VerifierError
    from edge.hybrid import HybridConfig, generate_hybrid
    from edge.resilient import ResilientSession
    from proto.distribution import CodecSpec

    codec = CodecSpec(args.codec, k=args.codec_k, eps=args.eps, k_max=args.k_max, bits=args.bits)
    u_th = args.threshold
    if args.calibration:
        calibration = load_calibration(args.calibration)
        if pairing_key(calibration["fingerprint"]) != pairing_key(model.manifest.fingerprint):
            raise UserError(f"{args.calibration} was made for {calibration['fingerprint']}, "
                            f"not this model ({model.manifest.fingerprint})")
        u_th = threshold_for(calibration, args.uncertainty, args.risk)
    config = HybridConfig(threshold=u_th, estimator=args.uncertainty, codec=codec, settings=settings,
                          max_new_tokens=args.max_new_tokens, samples=args.samples, lookahead=args.lookahead)
    failover, transport = _failover(args), _transport(args)
    sessions: list[ResilientSession] = []

    def open_session(prompt_ids, settings, codec, **open_args):  # conditioning_layer, span_stop_ids
        sessions.append(ResilientSession(failover, model.manifest.fingerprint, prompt_ids, settings, codec,
                                         seed=args.seed, timeout=args.timeout, transport=transport, **open_args))
        return sessions[-1]

    trace = open(args.trace, "w") if args.trace else None
    printer = CommittedText(model, prompt[0])
    try:
        result = generate_hybrid(model, prompt[1], config, seed=args.seed,
                                 open_session=open_session, trace=trace, on_commit=printer.add)
    except VerifierError as exc:
        partial = getattr(exc, "partial", None)
        printer.finish(partial.token_ids if partial is not None else [])  # nothing is lost: what was committed
        raise
    finally:
        if trace:
            trace.close()
    printer.finish(result.token_ids)
    acc = result.acceptance_rate
    return {"tokens": len(result.token_ids), "stopped": _stop_reason(result), "threshold": u_th if math.isfinite(u_th) else str(u_th),
            "transmission_rate": round(result.transmission_rate, 4),
            "acceptance_rate": None if acc is None else round(acc, 4),
            "uplink_bytes_per_token": round(result.uplink_bytes_per_token, 1),
            "lookahead": args.lookahead, "rolled_back": len(result.rolled_back),
            "stale_verifies": result.stale_verifies,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "reconnects": sessions[0].reconnects if sessions else 0,
            "unverified_tokens": result.unverified,
            "cloud_errors": sessions[0].errors if sessions else []}


class CommittedText:
    """Prints the prompt, then the generated text as it is committed (never a token a rejection could take
    back), then a newline. Holds back a trailing partial UTF-8 character until its next token arrives."""

    def __init__(self, model, prompt_text: str):
        self.model, self.ids, self.printed = model, [], ""
        print(prompt_text, end="", flush=True)

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self.model.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def finish(self, final_ids: list[int]) -> None:
        """Print whatever of ``final_ids`` (the committed tokens of the whole run) is not printed yet."""
        text = self.model.decode(list(final_ids))
        print(text[len(self.printed):] if text.startswith(self.printed) else "\n" + text, flush=True)


def _stop_reason(result) -> str:
    return "eos" if result.stopped_at_eos else "context_limit" if result.stopped_at_context_limit else "max_new_tokens"


def _check_prompt_fits(model, prompt_ids: list[int]) -> None:
    if model.context_full(len(prompt_ids)):
        raise UserError(f"the prompt is {len(prompt_ids):,} tokens: no room left in the model's context limit of "
                        f"{model.max_positions:,} positions; shorten it")


def _failover(args):
    from edge.resilient import Failover

    return Failover(addresses=tuple(args.verifier), on_cloud_loss=args.on_cloud_loss,
                    loss_after_s=args.cloud_loss_after, connect_timeout_s=min(args.timeout, 5.0))


def _transport(args):
    import os

    from edge.transport import Transport

    token = os.environ.get("EDGE_VERIFIER_TOKEN")
    if args.token_file:
        try:
            token = open(args.token_file).read().strip()
        except OSError as exc:
            raise UserError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    return Transport(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, tls=args.tls, token=token,
                     insecure=args.insecure)


def _prompt(args, model) -> tuple[str, list[int]]:
    """The prompt as (text, ids): ``--prompt`` as given, or ``--chat`` / ``--messages`` rendered with the model's
    own chat template (the template writes the special tokens, so none are added when encoding)."""
    if args.prompt is not None:
        return args.prompt, model.encode(args.prompt)
    from edge.chat import ChatTemplate, load_messages

    messages = load_messages(args.messages) if args.messages else [{"role": "user", "content": args.chat}]
    text = ChatTemplate.from_folder(model.folder).render(messages, add_generation_prompt=True)
    return text, model.encode(text, add_special_tokens=False)


def _generate(args) -> int:
    from edge.client import VerifierError
    from edge.model import EdgeModel
    from core.sampling import SamplingSettings

    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model = EdgeModel(args.model, providers=args.provider, threads=args.threads, backend=args.backend)
    prompt = _prompt(args, model)
    _check_prompt_fits(model, prompt[1])
    try:
        summary = (_hybrid if args.verifier else _local)(args, model, settings, prompt)
    except VerifierError as exc:
        raise UserError(str(exc)) from None
    summary.update(providers=model.runtime.providers, backend=model.backend)
    print(json.dumps(summary) if args.json else "  ".join(f"{k}={v}" for k, v in summary.items()))
    if summary["stopped"] == "context_limit":  # the text above is kept; say why it is shorter than asked
        raise UserError(f"stopped after {summary['tokens']:,} of --max-new-tokens {args.max_new_tokens:,}: the "
                        f"prompt ({len(prompt[1]):,} tokens) and the text reached the model's context limit of "
                        f"{model.max_positions:,} positions")
    return 0


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m edge", description="Edge side: the ONNX SLM that drafts every token.")
    sub = parser.add_subparsers()
    p = sub.add_parser("generate", help="generate text with the exported SLM")
    p.add_argument("--model", required=True, help="ONNX export folder (from python -m models export)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text, as the model sees it")
    what.add_argument("--chat", help="one user message, rendered with the model's chat template")
    what.add_argument("--messages", help="a JSON file: a list of {role, content} messages, rendered with the "
                                         "model's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "genai"],
                   help="edge runtime: ort (optimum exports), genai (onnxruntime-genai, for --builder genai "
                        "exports); auto = the one the export's manifest names")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    h = p.add_argument_group("hybrid (with a verifier)")
    h.add_argument("--verifier", type=addresses,
                   help="HOST:PORT of `python -m cloud serve` (several, comma-separated: replicas to fail over "
                        "to); omit for SLM-only")
    h.add_argument("--threshold", type=threshold, default=DEFAULT_THRESHOLD,
                   help=f"send a token iff its uncertainty u > this (default {DEFAULT_THRESHOLD}, for max-prob); "
                        "-inf = verify all (HLM), inf = never")
    h.add_argument("--uncertainty", default=DEFAULT_ESTIMATOR, choices=sorted(ESTIMATORS),
                   help=f"uncertainty estimator (default {DEFAULT_ESTIMATOR}; uhlm is U-HLM's, draft-dependent)")
    h.add_argument("--samples", type=positive_int, default=20, help="K for the perturbation estimators")
    h.add_argument("--codec", default="adaptive", choices=CODEC_NAMES, help="how the distribution is sent")
    h.add_argument("--codec-k", type=positive_int, default=30, help="topk: entries sent")
    h.add_argument("--eps", type=float, default=0.01, help="adaptive: tail mass left out")
    h.add_argument("--k-max", type=positive_int, default=64, help="adaptive: cap on entries sent")
    h.add_argument("--bits", type=positive_int, default=12, help="adaptive: probability resolution")
    h.add_argument("--lookahead", type=non_negative_int, default=0,
                   help="keep drafting this many tokens past the oldest unverified one while its verdict travels "
                        "(pipelining; 0 = stop-and-wait). The tokens are the same at any value")
    h.add_argument("--timeout", type=non_negative_float, default=30.0, help="seconds to wait for any reply")
    h.add_argument("--trace", help="write one JSON line per generated token to this file")
    h.add_argument("--on-cloud-loss", default="fail", choices=["fail", "wait", "local"],
                   help="when no verifier answers for --cloud-loss-after s: stop with an error (printing the "
                        "text so far), keep retrying, or go on SLM-only and mark unverified tokens")
    h.add_argument("--cloud-loss-after", type=positive_seconds, default=10.0,
                   help="seconds without any reachable verifier before --on-cloud-loss applies (default 10)")
    s = p.add_argument_group("security (see README)")
    s.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    s.add_argument("--tls-ca", help="PEM CA certificate to trust for the verifier (implies TLS)")
    s.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--token-file", help="file holding this device's bearer token (or set EDGE_VERIFIER_TOKEN)")
    s.add_argument("--insecure", action="store_true",
                   help="allow plaintext to a non-loopback verifier (loopback needs no flag)")
    h.add_argument("--calibration", help="calibration.json from `python -m eval calibrate`: sets --threshold")
    h.add_argument("--risk", default="averse",
                   help="with --calibration: averse (U-HLM -b/a), prone, or a number = tolerated mean rejection "
                        "of skipped tokens (the empirical choice)")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, user_errors=(ModelFolderError, ValueError))

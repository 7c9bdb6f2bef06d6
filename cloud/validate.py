"""Every check the verifier applies to what a client sends, each failing with a gRPC status and a message a
person can act on.

``SessionAbort`` carries the status code, the message, and a short ``reason`` label that the metrics count
rejected messages by. The servicer turns it into ``context.abort``: only that client's call ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from core.sampling import SamplingSettings
from core.stops import MAX_STOP_CHARS
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec, Compressed
from proto.payload import CodecError, decode
from proto.fingerprint import describe_mismatch
from proto.messages import (PROTOCOL_VERSION, codec_from_msg, conditioning_bytes, fingerprint_from_msg,
                            sampling_from_msg)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ORDER = grpc.StatusCode.FAILED_PRECONDITION


# gRPC sends the status message as trailing metadata, whose hard limit is a few kB: a message that echoes a
# 900 kB field reaches the client as RESOURCE_EXHAUSTED ("metadata size exceeds hard limit") instead.
MAX_DETAIL_CHARS = 1000
MAX_ECHO_CHARS = 80


def shown(value) -> str:
    """``repr(value)`` cut to MAX_ECHO_CHARS, saying how long it was: how a client's value is echoed back."""
    text = repr(value)
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text):,} characters)"


class SessionAbort(Exception):
    """Ends one call with a gRPC status code and a human-readable message; ``reason`` labels the metric.
    The message is capped at MAX_DETAIL_CHARS whatever a check put in it."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "invalid"):
        if len(message) > MAX_DETAIL_CHARS:
            message = message[:MAX_DETAIL_CHARS - 20] + " ... (truncated)"
        super().__init__(message)
        self.code = code
        self.reason = reason


def check_ids(ids, n: int, what: str) -> list[int]:
    """The ids as a list, or INVALID_ARGUMENT naming the first one outside the id space [0, n).

    Ids travel as uint32, so a client that encodes -1 arrives here as 4294967295 and is refused too. Ids
    past the tokenizer (the model's padding rows) are refused like any other: no text uses them.
    """
    bad = [t for t in ids if t >= n]
    if bad:
        raise SessionAbort(INVALID, f"{what} holds token id {bad[0]} outside the vocabulary (the tokenizer's id "
                           f"space [0, {n}))", "token_id")
    return list(ids)


def check_fingerprint(msg: pb.Fingerprint, own: dict, what: str) -> None:
    """FAILED_PRECONDITION unless the client's fingerprint pairs with ``own`` (tokenizer hash and id space).

    A client whose fingerprint has no id space predates id-space pairing: its payloads and ids may span
    the logit width, so it is refused with a message asking for an upgrade.
    """
    remote = fingerprint_from_msg(msg)
    if len(remote["tokenizer_hash"]) > MAX_ECHO_CHARS:  # a hash is 16 hex digits: never echo a huge one
        raise SessionAbort(ORDER, f"{what}.fingerprint.tokenizer_hash is {shown(remote['tokenizer_hash'])}, not a "
                           "tokenizer hash (16 hex digits)", "fingerprint")
    if remote["id_space"] is None:
        raise SessionAbort(ORDER, f"{what}.fingerprint has no id_space: this client predates id-space pairing "
                           "(tokenizer hash + id space; logit widths are no longer compared) and must be upgraded",
                           "fingerprint")
    mismatch = describe_mismatch(remote, own)
    if mismatch:
        raise SessionAbort(ORDER, mismatch, "fingerprint")


def check_sampling(msg: pb.Sampling, n: int, what: str) -> SamplingSettings:
    """The sampling settings, or INVALID_ARGUMENT; top-k may not exceed the id space ``n``."""
    try:
        settings = sampling_from_msg(msg)
    except ValueError as exc:
        raise SessionAbort(INVALID, f"bad {what}.sampling: {exc}", "sampling") from None
    if settings.top_k > n:
        raise SessionAbort(INVALID, f"{what}.sampling.top_k is {settings.top_k}, more than the vocabulary of {n}",
                           "sampling")
    return settings


def check_codec(msg: pb.Codec, n: int) -> CodecSpec:
    """The codec spec, or INVALID_ARGUMENT; a top set may not exceed the id space ``n``."""
    if len(msg.name) > MAX_ECHO_CHARS:
        raise SessionAbort(INVALID, f"bad Open.codec: unknown codec {shown(msg.name)}", "codec")
    try:
        codec = codec_from_msg(msg)
    except ValueError as exc:
        raise SessionAbort(INVALID, f"bad Open.codec: {exc}", "codec") from None
    k = codec.k if codec.name == "topk" else codec.k_max if codec.name == "adaptive" else 0
    if k > n:
        raise SessionAbort(INVALID, f"Open.codec: {codec.name} keeps up to {k} entries, more than the vocabulary "
                           f"of {n}", "codec")
    return codec


def check_prompt(ids, n: int, max_context: int, what: str, extra: int = 0) -> list[int]:
    """A non-empty prompt of valid ids that leaves room for ``extra`` more tokens in the context."""
    if not ids:
        raise SessionAbort(INVALID, f"{what} is empty: send at least one token", "context")
    if len(ids) + max(extra, 1) > max_context:
        raise SessionAbort(INVALID, f"{what} has {len(ids)} tokens; with {max(extra, 1)} more it exceeds the "
                           f"context limit of {max_context} tokens", "context")
    return check_ids(ids, n, what)


def check_protocol(op: pb.Open) -> None:
    """FAILED_PRECONDITION unless the client speaks this verifier's protocol version."""
    if op.protocol == PROTOCOL_VERSION:
        return
    if op.protocol < PROTOCOL_VERSION:
        raise SessionAbort(ORDER, f"this client speaks protocol {op.protocol or 1} (one draft per Verify, no "
                           f"positions or epochs); this verifier speaks protocol {PROTOCOL_VERSION}: upgrade the "
                           "edge", "protocol")
    raise SessionAbort(ORDER, f"Open.protocol is {op.protocol}, newer than this verifier's {PROTOCOL_VERSION}: "
                       "upgrade the verifier", "protocol")


def check_stop_chars(chars: str) -> str:
    """Open.span_stop_chars: a handful of characters (the ids holding them are the session's span stops)."""
    if len(chars) > MAX_STOP_CHARS:
        raise SessionAbort(INVALID, f"Open.span_stop_chars holds {len(chars)} characters ({shown(chars)}); give at "
                           f"most {MAX_STOP_CHARS}, e.g. ';#' (a span ends after any token holding one)", "span")
    return chars


def check_conditioning_layer(op: pb.Open, num_layers: int) -> int | None:
    """The layer whose prompt states Opened must carry (None: not asked), or INVALID_ARGUMENT naming the valid
    range 0..num_layers (hidden_states[0] is the embeddings, [num_layers] the last layer after the final norm)."""
    if not op.HasField("conditioning_layer"):
        return None
    layer = op.conditioning_layer
    if not num_layers:
        raise SessionAbort(INVALID, "Open.conditioning_layer is set, but this verifier's model exposes no decoder "
                           "layers to take prompt states from: open without conditioning", "conditioning")
    if layer > num_layers:
        raise SessionAbort(INVALID, f"Open.conditioning_layer is {layer}, but the verifier's model has {num_layers} "
                           f"decoder layers: ask for 0 (the embeddings) to {num_layers} (the last layer's output); "
                           "the SLM's manifest names a layer of another LLM", "conditioning")
    return int(layer)


def check_conditioning_fits(prompt_len: int, dim: int, layer: int, opened_bytes: int, limit: int) -> None:
    """INVALID_ARGUMENT when an Opened carrying ``prompt_len`` x ``dim`` float16 states (``opened_bytes``: the
    CloudMessage without them) would exceed the message limit: gRPC would fail the call with a status that looks
    retryable, after the forward."""
    states = conditioning_bytes(prompt_len, dim)
    total = opened_bytes + states + 24  # + tags and lengths: the two new fields' and the wrapper's longer one
    if total > limit:
        raise SessionAbort(INVALID, f"Open asks for the LLM's layer-{layer} states of a {prompt_len}-token prompt: "
                           f"{prompt_len} x {dim} float16 = {states:,} bytes, over the verifier's message limit of "
                           f"{limit:,} bytes; shorten the prompt or raise the verifier's --max-message-bytes",
                           "conditioning")


@dataclass(frozen=True)
class Span:
    """A checked span request: the LLM continues until one of ``stop_ids`` or ``max_tokens`` tokens."""

    stop_ids: frozenset[int]
    max_tokens: int


@dataclass(frozen=True)
class Step:
    """A checked step to judge: its ids, the score rule, the acceptance threshold, how far to regenerate."""

    ids: list[int]
    score: str
    threshold: float
    regenerate: Span


STEP_SCORES = ("min", "mean")


@dataclass(frozen=True)
class CheckedVerify:
    """A well-formed Verify of the session's current epoch: pending ids, the block's (draft, p~) pairs, and
    the span or step it carries (None when it carries none)."""

    pending: list[int]
    block: list[tuple[int, Compressed]]
    span: Span | None = None
    step: Step | None = None


STALE = "stale"  # what check_verify returns for a Verify drafted in an ended epoch


def check_verify(v: pb.Verify, expected_seq: int, context_len: int, epoch: int, codec: CodecSpec, n: int,
                 max_context: int, span_stop_ids: frozenset[int] = frozenset()) -> CheckedVerify | str:
    """The checked content of a Verify, ``STALE`` for one drafted in an ended epoch, or SessionAbort naming
    what is wrong. ``context_len`` and ``epoch`` are the session's agreed length and current epoch;
    ``span_stop_ids`` (the Open's) end a span that names no stop ids of its own."""
    if v.seq != expected_seq:
        raise SessionAbort(INVALID, f"Verify.seq is {v.seq}, expected {expected_seq} (numbered from 1, one more "
                           "per Verify, stale ones included)", "seq")
    if v.epoch > epoch:
        raise SessionAbort(INVALID, f"Verify.epoch is {v.epoch}, but the session is in epoch {epoch}: an epoch "
                           "only ends with a rejection the verifier sent (client bug)", "epoch")
    if v.epoch < epoch:
        return STALE
    if v.position != context_len:
        raise SessionAbort(INVALID, f"Verify.position is {v.position}, but the session holds {context_len} agreed "
                           "tokens: the first pending id (or draft) must come right after them (client bug)",
                           "position")
    has_span, has_step = v.HasField("span"), v.HasField("step")
    if has_step and (v.block or has_span):
        raise SessionAbort(INVALID, "a Verify carrying a step has no block and no span: the step is judged alone",
                           "step")
    if not v.block and not (has_span or has_step):
        raise SessionAbort(INVALID, "Verify.block is empty: send at least one drafted position (or a span or a "
                           "step)", "block")
    drafted = len(v.step.step_ids) if has_step else len(v.block)
    total = context_len + len(v.pending_ids) + drafted
    if total > max_context or (has_span and total >= max_context):
        raise SessionAbort(INVALID, f"Verify carries {len(v.pending_ids)} pending ids and {drafted} drafted ids"
                           f"{' and asks for a span' if has_span else ''}; the session would hold {total} tokens, "
                           f"at or over the context limit of {max_context}", "context")
    pending = check_ids(v.pending_ids, n, "Verify.pending_ids")
    block = [_check_drafted(d, j, codec, n) for j, d in enumerate(v.block)]
    span = _check_span(v.span, n, "Verify.span", span_stop_ids) if has_span else None
    return CheckedVerify(pending, block, span, _check_step(v.step, n, span_stop_ids) if has_step else None)


def _check_span(span: pb.SpanRequest, n: int, what: str, session_stops: frozenset[int]) -> Span:
    if span.max_tokens < 1:
        raise SessionAbort(INVALID, f"{what}.max_tokens is 0: ask for at least one token", "span")
    stops = frozenset(check_ids(span.stop_ids, n, f"{what}.stop_ids")) if span.stop_ids else session_stops
    return Span(stops, int(span.max_tokens))


def _check_step(step: pb.StepToJudge, n: int, session_stops: frozenset[int]) -> Step:
    if not step.step_ids:
        raise SessionAbort(INVALID, "Verify.step.step_ids is empty: send the drafted step's ids", "step")
    if step.score not in STEP_SCORES:
        raise SessionAbort(INVALID, f"Verify.step.score is {shown(step.score)}; use one of {', '.join(STEP_SCORES)}",
                           "step")
    if not 0.0 <= step.threshold <= 1.0:  # NaN fails this too
        raise SessionAbort(INVALID, f"Verify.step.threshold is {step.threshold}; it must be in [0, 1]", "step")
    ids = check_ids(step.step_ids, n, "Verify.step.step_ids")
    return Step(ids, step.score, float(step.threshold), _check_span(step.regenerate, n, "Verify.step.regenerate",
                                                                     session_stops))


def _check_drafted(d: pb.DraftedPosition, j: int, codec: CodecSpec, n: int) -> tuple[int, Compressed]:
    """One drafted position of a block: its token and decoded p~, with the draft inside p~'s support."""
    check_ids([d.token_id], n, f"Verify.block[{j}].token_id")
    try:
        p_tilde = decode(d.distribution, codec, n)
    except CodecError as exc:
        raise SessionAbort(INVALID, f"Verify.block[{j}].distribution: {exc}", "distribution") from None
    if not p_tilde.contains(d.token_id):
        raise SessionAbort(INVALID, f"Verify.block[{j}]: draft {d.token_id} has probability 0 in the sent "
                           "distribution; drafts must be drawn from the distribution that is sent", "draft_support")
    return d.token_id, p_tilde

"""gRPC client of the verifier: one bidirectional stream per generation session, a deadline on every wait.

The sync gRPC API blocks on a response iterator with no per-message timeout, so a reader thread moves
responses into a queue and every wait is a ``queue.get(timeout=...)``; on timeout the call is cancelled.
Every message's wire size (serialized + 5-byte gRPC prefix) is counted, so reports can state uplink
and downlink bytes exactly.

A session opened with ``conditioning_layer`` (an SLM conditioned on the LLM's prompt states, LLM-to-SLM) asks
for those states in Open; ``conditioning()`` waits for Opened and returns them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import grpc
import numpy as np

from core.sampling import SamplingSettings
from edge.transport import Transport
from proto import hybrid_pb2 as pb
from proto import hybrid_pb2_grpc as pb_grpc
from proto.distribution import CodecSpec
from proto.fingerprint import describe_mismatch
from proto.messages import (PROTOCOL_VERSION, codec_to_msg, conditioning_from_msg, fingerprint_from_msg,
                            fingerprint_to_msg, sampling_to_msg, wire_size)
from proto.payload import max_encoded_size

_END = object()
# A Verify's bytes beside its distribution and pending ids: seq, position, epoch, draft id, tags, lengths.
VERIFY_ENVELOPE_BYTES = 64
# No verifier may set a message limit below this (cloud.server.ServerLimits): a Verify this small can go out
# before Opened has said what the limit is.
MIN_MESSAGE_LIMIT = 1024
PLAINTEXT = Transport()


class VerifierError(RuntimeError):
    """The verifier refused or dropped the session; ``code`` is the gRPC status code when there is one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VerdictResult:
    accepted: bool  # every draft of the block was accepted
    token: int  # the resampled token at the first rejection, or the block's last draft
    target_prob: float  # q(first draft), when the session asked for it
    wait_seconds: float  # from sending Verify to receiving its Verdict
    uplink_bytes: int  # this Verify on the wire
    downlink_bytes: int  # its Verdict on the wire
    server_seconds: float  # the verifier's own time for it (queue for the model + forward + rejection)
    accepted_count: int = 1  # the longest accepted prefix of the block
    stale: bool = False  # drafted in an epoch that had ended: nothing was verified
    epoch: int = 0  # the session's epoch after this Verify
    target_probs: tuple[float, ...] = ()  # q(draft) per decided position, when asked for
    queue_seconds: float = 0.0  # the part of server_seconds the verifier spent waiting for its model
    span_ids: tuple[int, ...] = ()  # the LLM's own tokens: a requested span, or a judged step regenerated
    step_accepted: bool = False  # a judged step was accepted whole
    step_score: float = 0.0


@dataclass(frozen=True)
class _Sent:
    """A Verify on its way: what its Verdict is matched and measured against."""

    seq: int
    t_sent: float
    size: int
    pending: int
    block: int
    step: int = 0  # ids of a step to judge (0: no step)


def _decided(sent: _Sent, verdict: pb.Verdict) -> int:
    """Positions a Verdict agreed beside the pending ids and any span: a judged step's ids when accepted; a
    block's accepted prefix plus the resampled token at a rejection."""
    if sent.step:
        return sent.step if verdict.step_accepted else 0
    if not sent.block:
        return 0  # a bare span request
    return verdict.accepted_count + (not verdict.accepted)


def connect(address: str, timeout: float = 10.0, transport: Transport = PLAINTEXT) -> grpc.Channel:
    """A channel to ``address`` once it is ready (VerifierError after ``timeout``), plaintext or TLS with an
    optional bearer token as ``transport`` says."""
    try:
        channel = transport.channel(address)
    except ValueError as exc:
        raise VerifierError(str(exc)) from None
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        raise VerifierError(f"no verifier reachable at {address} within {timeout:g} s") from None
    return channel


class VerifierSession:
    """One session on one stream: ``submit`` Verifies (without waiting), ``next_verdict`` in order, ``close``.

    Protocol v2 (proto/hybrid.proto): each Verify names its position and epoch, so the edge may keep
    drafting and sending while earlier Verdicts travel. The session does not wait for ``Opened`` before the
    first Verify: it checks Opened (id space, message limit) when it arrives, and only a Verify larger than
    any verifier's smallest allowed message limit waits for it first. It also tracks the agreed length and
    epoch from the Verdicts, for ``verify``, the stop-and-wait shorthand.

    ``conditioning_layer``: ask Opened to carry the LLM's hidden states of the prompt at that layer
    (``conditioning()``); None sends the Open of an unconditioned SLM, byte for byte.
    """

    lost = False  # a plain session never gives up quietly: failures raise

    def __init__(self, channel: grpc.Channel, fingerprint: dict, prompt_ids: list[int], settings: SamplingSettings,
                 codec: CodecSpec, seed: int | None = None, report_target_prob: bool = False,
                 timeout: float = 30.0, epoch: int = 0, conditioning_layer: int | None = None,
                 span_stop_ids: list[int] | tuple[int, ...] = (), span_stop_chars: str = ""):
        self.timeout = timeout
        self.report_target_prob = report_target_prob
        self.uplink_bytes = self.downlink_bytes = 0
        self.agreed = len(prompt_ids)  # tokens both sides agree on, as of the last Verdict received
        self.epoch = epoch  # the session's epoch as of the last Verdict received
        self._seq = 0
        self._in_flight: deque[_Sent] = deque()
        self._opened: pb.Opened | None = None
        self._codec = codec
        self._fingerprint = fingerprint
        self.id_space = int(fingerprint["id_space"])
        self.prompt_len = len(prompt_ids)
        self.conditioning_layer = conditioning_layer
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = pb_grpc.VerifierStub(channel).Session(iter(self._requests.get, _END))
        threading.Thread(target=self._read, daemon=True).start()
        open_msg = pb.Open(fingerprint=fingerprint_to_msg(fingerprint), sampling=sampling_to_msg(settings),
                           prompt_ids=prompt_ids, codec=codec_to_msg(codec), report_target_prob=report_target_prob,
                           protocol=PROTOCOL_VERSION, epoch=epoch)
        if seed is not None:
            open_msg.seed = seed
        open_msg.span_stop_ids.extend(span_stop_ids)  # spans and regenerated steps stop there (sent once)
        open_msg.span_stop_chars = span_stop_chars  # ... and after any token holding one of these characters
        if conditioning_layer is not None:
            open_msg.conditioning_layer = conditioning_layer
        self._send(pb.EdgeMessage(open=open_msg))

    @property
    def opened(self) -> pb.Opened:
        """The verifier's Opened, received (and checked) on first use."""
        if self._opened is None:
            self._opened = self._receive("opened").opened
            self._check_verifier_id_space()
            self._check_message_limit(self._codec)
        return self._opened

    def conditioning(self) -> np.ndarray:
        """The LLM's hidden states of the prompt, [prompt_len, dim] float32, from Opened (waits for it). A
        verifier that answers without them predates prompt conditioning: refused (no retry can fix it)."""
        if self.conditioning_layer is None:
            raise VerifierError("conditioning() on a session opened without conditioning_layer (client bug)")
        opened = self.opened
        try:
            states = conditioning_from_msg(opened)
        except ValueError as exc:
            self._refuse(f"the verifier answered Open without the prompt states of layer {self.conditioning_layer} "
                         f"({exc}): it predates LLM-to-SLM prompt conditioning; upgrade it")
        if states.shape[0] != self.prompt_len:
            self._refuse(f"the verifier sent prompt states for {states.shape[0]} positions, but the prompt has "
                         f"{self.prompt_len} tokens (protocol error)")
        return states

    def _refuse(self, message: str) -> None:
        """End the call and raise an error no retry can fix (a verifier that does not share our id space)."""
        self._call.cancel()
        raise VerifierError(message, grpc.StatusCode.FAILED_PRECONDITION)

    def _check_verifier_id_space(self) -> None:
        """An older verifier pairs on logit widths and may return padding ids: refuse it up front."""
        theirs = fingerprint_from_msg(self._opened.fingerprint)
        if theirs["id_space"] is None:
            self._refuse("the verifier reports no id space: it predates id-space pairing (it could return "
                         "padding ids); upgrade it")
        mismatch = describe_mismatch(self._fingerprint, theirs)
        if mismatch:
            self._refuse(f"{mismatch}; re-point the edge to a verifier of this model pair")

    def _check_message_limit(self, codec: CodecSpec) -> None:
        """A codec whose largest Verify cannot fit the verifier's message limit would be refused mid-generation
        (RESOURCE_EXHAUSTED, which looks retryable): refuse the configuration up front instead."""
        limit = self._opened.max_message_bytes  # 0: a verifier that does not say
        worst = max_encoded_size(codec, self.id_space) + VERIFY_ENVELOPE_BYTES
        if limit and worst > limit:
            self._refuse(f"codec {codec.name} over {self.id_space:,} ids makes Verify messages of up to "
                         f"{worst:,} bytes, over the verifier's limit of {limit:,} bytes; use --codec adaptive or "
                         "topk, or raise the verifier's --max-message-bytes")

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(_END)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def _send(self, msg: pb.EdgeMessage) -> int:
        size = wire_size(msg)
        self.uplink_bytes += size
        self._requests.put(msg)
        return size

    def _receive(self, kind: str, timeout: float | None = None) -> pb.CloudMessage:
        try:
            item = self._responses.get(timeout=self.timeout if timeout is None else timeout)
        except queue.Empty:
            self._call.cancel()
            raise VerifierError(f"no {kind} from the verifier within {self.timeout:g} s") from None
        if isinstance(item, grpc.RpcError):
            raise VerifierError(f"verifier ended the session: {item.code().name}: {item.details()}", item.code())
        if item is _END or item.WhichOneof("kind") != kind:
            raise VerifierError(f"verifier closed the stream or sent {item!r} where {kind} was expected")
        self.downlink_bytes += wire_size(item)
        return item

    @property
    def in_flight(self) -> int:
        """Verifies sent whose Verdict has not been taken yet."""
        return len(self._in_flight)

    def submit(self, pending: list[int], position: int, epoch: int, block: list[tuple[int, bytes]],
               span: pb.SpanRequest | None = None, step: pb.StepToJudge | None = None) -> int:
        """Send a Verify of ``block`` ((draft, encoded p~) per drafted position) after ``pending``, drafted in
        ``epoch`` with its first pending id at ``position``, optionally asking for a ``span`` after it or
        carrying a ``step`` to judge instead of a block; returns its bytes on the wire. Does not wait."""
        self._seq += 1
        request = pb.EdgeMessage(verify=pb.Verify(
            seq=self._seq, pending_ids=pending, position=position, epoch=epoch, span=span, step=step,
            block=[pb.DraftedPosition(token_id=t, distribution=d) for t, d in block]))
        if request.ByteSize() > MIN_MESSAGE_LIMIT or self._opened is not None:
            limit = self.opened.max_message_bytes  # a large Verify waits for Opened: it may not fit
            if limit and request.ByteSize() > limit:  # many pending ids: the server would refuse it
                self._refuse(f"a Verify of {request.ByteSize():,} bytes ({len(pending):,} pending ids) exceeds "
                             f"the verifier's limit of {limit:,} bytes; raise the verifier's --max-message-bytes")
        size = self._send(request)
        self._in_flight.append(_Sent(self._seq, time.perf_counter(), size, len(pending), len(block),
                                     len(step.step_ids) if step is not None else 0))
        return size

    def next_verdict(self, wait: bool = True) -> VerdictResult | None:
        """The Verdict of the oldest Verify in flight; None when ``wait`` is False and it has not arrived."""
        if not self._in_flight:
            raise VerifierError("next_verdict with no Verify in flight (client bug)")
        if self._opened is None:  # Opened comes first on every session: take it (and check it) on the way
            if not wait and self._responses.empty():
                return None
            _ = self.opened
        if not wait and self._responses.empty():
            return None
        message = self._receive("verdict")
        sent = self._in_flight.popleft()
        verdict = message.verdict
        if verdict.seq != sent.seq:
            raise VerifierError(f"verdict for seq {verdict.seq} arrived, expected {sent.seq}")
        outside = [t for t in (verdict.token_id, *verdict.span_ids) if t >= self.id_space]
        if outside:
            self._refuse(f"the verifier returned token {outside[0]}, outside the id space {self.id_space}")
        if not verdict.stale:
            self.agreed += sent.pending + _decided(sent, verdict) + len(verdict.span_ids)
            self.epoch = verdict.epoch
        probs = tuple(verdict.target_probs)
        return VerdictResult(verdict.accepted, verdict.token_id, probs[0] if probs else 0.0,
                             time.perf_counter() - sent.t_sent, sent.size, wire_size(message), verdict.server_seconds,
                             verdict.accepted_count, verdict.stale, verdict.epoch, probs, verdict.queue_seconds,
                             tuple(verdict.span_ids), verdict.step_accepted, verdict.step_score)

    def verify(self, pending: list[int], draft: int, distribution: bytes) -> VerdictResult:
        """Stop-and-wait shorthand: one drafted position after ``pending``, at the agreed position and epoch."""
        self.submit(pending, self.agreed, self.epoch, [(draft, distribution)])
        return self.next_verdict()

    def close(self) -> None:
        """End the session. After at least one Verify, say Close; a session that never verified just
        half-closes its stream (the server ends it the same way), so SLM-only runs send nothing after Open."""
        if self._seq:
            self._send(pb.EdgeMessage(close=pb.Close()))
        self._requests.put(_END)


def generate_remote(channel: grpc.Channel, fingerprint: dict, prompt_ids: list[int], settings: SamplingSettings,
                    max_new_tokens: int, stop_ids: list[int], seed: int | None = None,
                    timeout: float = 120.0) -> tuple[list[int], int, int]:
    """Cloud-only baseline: the large model's tokens for ``prompt_ids``; returns (tokens, up bytes, down bytes)."""
    request = pb.GenerateRequest(fingerprint=fingerprint_to_msg(fingerprint), sampling=sampling_to_msg(settings),
                                 prompt_ids=prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    if seed is not None:
        request.seed = seed
    tokens, down = [], 0
    try:
        for chunk in pb_grpc.VerifierStub(channel).Generate(request, timeout=timeout):
            tokens.extend(chunk.token_ids)
            down += wire_size(chunk)
    except grpc.RpcError as exc:
        raise VerifierError(f"verifier refused Generate: {exc.code().name}: {exc.details()}", exc.code()) from None
    return tokens, wire_size(request), down

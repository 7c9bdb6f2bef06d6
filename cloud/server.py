"""The verifier gRPC service: a servicer whose methods mirror `proto/hybrid.proto`, plus health and reflection.

Each session is one bidirectional stream handled on its own server thread, so one session's network
I/O never blocks another's; model forwards are serialized inside the engine. A bad message ends only
its own session, with a gRPC status and a message a person can act on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.engine import SessionState, VerifierModel
from proto import hybrid_pb2 as pb
from proto import hybrid_pb2_grpc as pb_grpc
from proto.codec import CodecError, decode
from proto.fingerprint import describe_mismatch
from proto.messages import codec_from_msg, sampling_from_msg

log = logging.getLogger("cloud.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Verifier"].full_name
MAX_MESSAGE_BYTES = 1 << 20  # full32 at a 152k vocabulary is 608 KB; 1 MiB leaves room, below gRPC's 4 MiB


class SessionAbort(Exception):
    """Ends one session with a gRPC status code and a human-readable message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _check_ids(ids, vocab: int, what: str) -> list[int]:
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{what} holds token id {bad[0]} outside the vocabulary [0, {vocab})")
    return list(ids)


def _check_fingerprint(msg: pb.Fingerprint, engine: VerifierModel) -> None:
    remote = {"vocab_size": msg.vocab_size, "tokenizer_hash": msg.tokenizer_hash}
    mismatch = describe_mismatch(remote, engine.fingerprint)
    if mismatch:
        raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)


class VerifierServicer(pb_grpc.VerifierServicer):
    def __init__(self, engine: VerifierModel):
        self.engine = engine

    # -- Session -------------------------------------------------------------------------------------
    def _open(self, msg: pb.EdgeMessage) -> SessionState:
        if msg.WhichOneof("kind") != "open":
            raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"a session must start with Open, got {msg.WhichOneof('kind') or 'an empty message'}")
        op = msg.open
        _check_fingerprint(op.fingerprint, self.engine)
        try:
            settings, codec = sampling_from_msg(op.sampling), codec_from_msg(op.codec)
        except ValueError as exc:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"bad Open: {exc}") from None
        prompt = _check_ids(op.prompt_ids, self.engine.vocab_size, "Open.prompt_ids")
        if not prompt:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, "Open.prompt_ids is empty: send at least one token")
        if len(prompt) >= self.engine.max_context:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"prompt of {len(prompt)} tokens exceeds the context limit {self.engine.max_context}")
        state = self.engine.open(prompt, settings, codec, op.seed if op.HasField("seed") else None)
        state.report_target_prob = op.report_target_prob
        return state

    def _verify(self, state: SessionState, v: pb.Verify, expected_seq: int) -> pb.Verdict:
        t_received = time.perf_counter()
        if v.seq != expected_seq:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"Verify.seq is {v.seq}, expected {expected_seq}")
        vocab = self.engine.vocab_size
        pending = _check_ids(v.pending_ids, vocab, "Verify.pending_ids")
        _check_ids([v.draft_id], vocab, "Verify.draft_id")
        if len(state.context) + len(pending) + 1 > self.engine.max_context:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"session would exceed the context limit of {self.engine.max_context} tokens")
        try:
            p_tilde = decode(v.distribution, state.codec, vocab)
        except CodecError as exc:
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"Verify.distribution: {exc}") from None
        if not p_tilde.contains(v.draft_id):
            raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                               f"draft {v.draft_id} has probability 0 in the sent distribution; "
                               "drafts must be drawn from the distribution that is sent")
        outcome = self.engine.verify(state, pending, v.draft_id, p_tilde)
        return pb.Verdict(seq=v.seq, accepted=outcome.accepted, token_id=outcome.token,
                          target_prob=outcome.target_prob if state.report_target_prob else 0.0,
                          server_seconds=time.perf_counter() - t_received)

    def Session(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
            if first is None:
                return
            state = self._open(first)
            yield pb.CloudMessage(opened=pb.Opened(
                session_id=state.session_id, max_context=self.engine.max_context,
                max_message_bytes=MAX_MESSAGE_BYTES,
                fingerprint=pb.Fingerprint(**self.engine.fingerprint)))
            expected = 1
            for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "close":
                    return
                if kind != "verify":
                    raise SessionAbort(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"unexpected {kind or 'empty message'} inside an open session")
                yield pb.CloudMessage(verdict=self._verify(state, msg.verify, expected))
                expected += 1
        except SessionAbort as exc:
            log.info("session aborted: %s %s", exc.code.name, exc)
            context.abort(exc.code, str(exc))

    # -- Generate (cloud-only baseline) -----------------------------------------------------------------
    def Generate(self, request, context):
        try:
            _check_fingerprint(request.fingerprint, self.engine)
            try:
                settings = sampling_from_msg(request.sampling)
            except ValueError as exc:
                raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT, f"bad GenerateRequest: {exc}") from None
            prompt = _check_ids(request.prompt_ids, self.engine.vocab_size, "GenerateRequest.prompt_ids")
            if not prompt or len(prompt) + request.max_new_tokens > self.engine.max_context:
                raise SessionAbort(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"need 1 <= prompt + max_new_tokens <= {self.engine.max_context} tokens")
            seed = request.seed if request.HasField("seed") else None
            for token in self.engine.generate(prompt, settings, seed, request.max_new_tokens, set(request.stop_ids)):
                if not context.is_active():
                    return
                yield pb.GenerateChunk(token_ids=[token])
        except SessionAbort as exc:
            context.abort(exc.code, str(exc))


def build_server(engine: VerifierModel, address: str, max_workers: int = 64) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server with the Verifier, health and reflection services."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_VerifierServicer_to_server(VerifierServicer(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def serve(engine: VerifierModel, host: str, port: int, ready_line: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting and give in-flight calls a grace period."""
    server, bound = build_server(engine, f"{host}:{port}")
    server.start()
    if ready_line:
        print(f"verifier listening on {host}:{bound}", flush=True)  # tests and scripts wait for this line
    stopped = threading.Event()

    def _stop(signum, frame):
        server.stop(grace=5).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()

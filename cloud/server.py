"""The verifier gRPC service: a servicer whose methods mirror `proto/hybrid.proto`, plus health and reflection.

Each session is one bidirectional stream handled on its own server thread, so one session's network
I/O never blocks another's; model forwards are serialized inside the engine. A bad message ends only
its own session, with a gRPC status and a message a person can act on (checks in ``cloud/validate.py``).

Limits (``ServerLimits``): message size, concurrent sessions and Generate calls (RESOURCE_EXHAUSTED past
it), context length, an open timeout and a cap on streams still to send Open (the oldest is evicted), and
an idle timeout: an open session that sends nothing for that long is evicted (DEADLINE_EXCEEDED), which
bounds every wait of the server on a client. On SIGTERM the server drains: health turns
NOT_SERVING, new calls are refused (UNAVAILABLE), a Verify being computed is answered, every session
then ends with UNAVAILABLE at its next message (the edge replays its history elsewhere), and the
process exits after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import queue
import signal
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.auth import TokenAuthInterceptor, TokenStore
from cloud.engine import SessionState, VerifierModel
from cloud.metrics import EngineCollector, VerifierMetrics
from cloud.validate import (INVALID, ORDER, STALE, SessionAbort, check_codec, check_conditioning_fits,
                            check_conditioning_layer, check_fingerprint, check_ids, check_stop_chars, check_prompt, check_protocol,
                            check_sampling, check_verify)
from core.process import VERIFIER_READY
from proto import hybrid_pb2 as pb
from proto.messages import conditioning_to_bytes, fingerprint_to_msg

log = logging.getLogger("cloud.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Verifier"].full_name
EVICTION_REASONS = ("idle", "shutdown")  # sessions the server ends, counted as evictions, not rejects
_POLL_S = 0.25  # how often a waiting session looks at the drain flag
try:
    _LIBC = ctypes.CDLL("libc.so.6")  # glibc: malloc_trim; other C libraries simply skip the trim
    _LIBC.malloc_trim
except (OSError, AttributeError):
    _LIBC = None


@dataclass(frozen=True)
class ServerLimits:
    # full32 at a 152k vocabulary is 608 KB; 1 MiB leaves room and stays below gRPC's 4 MiB default.
    max_message_bytes: int = 1 << 20
    max_sessions: int = 64
    max_context: int = 0  # 0 = the model's own limit (max_position_embeddings)
    idle_timeout_s: float = 60.0
    shutdown_grace_s: float = 10.0
    # A stream must send Open this soon, and only so many may be waiting to (past that the oldest is evicted):
    # streams that never open would otherwise hold server threads until the idle timeout and lock out health
    # checks and new sessions.
    open_timeout_s: float = 5.0
    max_pending_opens: int = 16

    def __post_init__(self):
        checks = {"max_message_bytes": self.max_message_bytes >= 1024, "max_sessions": self.max_sessions >= 1,
                  "max_context": self.max_context >= 0,
                  "idle_timeout_s": math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0,
                  "shutdown_grace_s": math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0,
                  "open_timeout_s": math.isfinite(self.open_timeout_s) and self.open_timeout_s > 0,
                  "max_pending_opens": self.max_pending_opens >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"bad server limit {bad[0]}={getattr(self, bad[0])!r}")


class Unparseable:
    """What the request deserializer returns for bytes that are not the expected message, so the servicer
    can answer INVALID_ARGUMENT (gRPC's own deserialization failure would be an opaque INTERNAL)."""

    def __init__(self, error: str):
        self.error = error


def _tolerant(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as exc:
            return Unparseable(str(exc))
    return parse


class Inbox:
    """The client's messages, read by a thread into a queue so that every wait has a timeout."""

    END = object()
    EVICTED = object()  # put in by the server itself: this stream waited too long to send Open

    def __init__(self, request_iterator):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()

    def _read(self, request_iterator) -> None:
        try:
            for msg in request_iterator:
                self._queue.put(msg)
        except Exception:  # the call ended (cancelled, aborted, peer gone): nothing more will come
            pass
        self._queue.put(self.END)

    def get(self, timeout: float):
        return self._queue.get(timeout=timeout)

    def evict(self) -> None:
        """Wake the handler waiting on this inbox at once, with EVICTED."""
        self._queue.put(self.EVICTED)


def _return_free_memory() -> None:
    """Hand freed heap back to the OS once the server is idle. Each session thread allocates in its own
    glibc arena, and without a trim those arenas keep their peak size after a burst of sessions."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class VerifierServicer:
    """Methods mirror the proto: Session (bidirectional stream) and Generate (LLM-only baseline)."""

    def __init__(self, engine: VerifierModel, limits: ServerLimits, metrics: VerifierMetrics):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.max_context = min(engine.max_context, limits.max_context or engine.max_context)
        self.draining = threading.Event()
        self._sessions: dict[str, SessionState] = {}
        self._generates = 0  # Generate calls in progress: they count against max_sessions too
        self._pending_opens: deque[Inbox] = deque()  # streams that have not sent Open yet, oldest first
        self._lock = threading.Lock()

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- admission ---------------------------------------------------------------------------------------
    def _check_serving(self) -> None:
        if self.draining.is_set():
            raise SessionAbort(grpc.StatusCode.UNAVAILABLE, "verifier is shutting down; reopen the session on "
                               "another replica (the edge replays its history)", "shutdown")

    def _check_capacity(self) -> None:
        """RESOURCE_EXHAUSTED when sessions and Generate calls fill max_sessions; call with the lock held."""
        if len(self._sessions) + self._generates >= self.limits.max_sessions:
            raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"verifier is at its limit of "
                               f"{self.limits.max_sessions} concurrent sessions; retry later or use another "
                               "replica", "capacity")

    def _admit(self, state: SessionState) -> None:
        with self._lock:
            self._check_capacity()
            self._sessions[state.session_id] = state
            count = len(self._sessions)
        self.metrics.sessions.set(count)
        self.metrics.sessions_opened.inc()

    @contextlib.contextmanager
    def _awaiting_open(self, inbox: Inbox):
        """Count this stream among those that have not sent Open; past ``max_pending_opens`` the one that has
        waited longest is evicted at once (a client that opens promptly is never the oldest for long, so
        streams that never open cannot keep new sessions out)."""
        with self._lock:
            self._pending_opens.append(inbox)
            while len(self._pending_opens) > self.limits.max_pending_opens:
                self._pending_opens.popleft().evict()
        try:
            yield
        finally:
            with self._lock:
                if inbox in self._pending_opens:
                    self._pending_opens.remove(inbox)

    @contextlib.contextmanager
    def _generating(self):
        """Count a Generate call against max_sessions while it runs."""
        with self._lock:
            self._check_capacity()
            self._generates += 1
        try:
            yield
        finally:
            with self._lock:
                self._generates -= 1

    def _release(self, state: SessionState) -> None:
        with self._lock:
            released = self._sessions.pop(state.session_id, None) is not None
            count = len(self._sessions)
        if released:
            self.engine.close(state)
        self.metrics.sessions.set(count)
        if released and count == 0:
            _return_free_memory()

    # -- Session -------------------------------------------------------------------------------------
    def _next(self, inbox: Inbox, expected: str, opening: bool = False):
        """The client's next message (None when it half-closed), waiting at most the idle timeout, or the open
        timeout for a stream's first message (``opening``)."""
        timeout = self.limits.open_timeout_s if opening else self.limits.idle_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            self._check_serving()
            remaining = deadline - time.monotonic()
            if remaining <= 0 and opening:
                raise SessionAbort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no Open within the open timeout of "
                                   f"{timeout:g} s: a stream must start with Open", "open_timeout")
            if remaining <= 0:
                raise SessionAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no {expected} within the idle timeout of {timeout:g} s; session evicted: "
                                   "reopen it to continue (the edge replays its history)", "idle")
            try:
                msg = inbox.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            if msg is Inbox.END:
                return None
            if msg is Inbox.EVICTED:
                raise SessionAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"evicted before Open: more than "
                                   f"{self.limits.max_pending_opens} streams were waiting to send Open; a stream "
                                   "must start with Open", "pending_open")
            if isinstance(msg, Unparseable):
                raise SessionAbort(INVALID, f"not a valid hybrid.v1.EdgeMessage ({msg.error})", "parse")
            return msg

    def _open(self, msg: pb.EdgeMessage) -> tuple[SessionState, int | None]:
        """The admitted session and the layer whose prompt states its Opened carries (None: not asked)."""
        kind = msg.WhichOneof("kind")
        if kind != "open":
            raise SessionAbort(ORDER, f"a session must start with Open, got {kind or 'an empty message'}", "order")
        op, n = msg.open, self.engine.id_space
        check_protocol(op)
        check_fingerprint(op.fingerprint, self.engine.fingerprint, "Open")
        settings = check_sampling(op.sampling, n, "Open")
        codec = check_codec(op.codec, n)
        prompt = check_prompt(op.prompt_ids, n, self.max_context, "Open.prompt_ids")
        layer = check_conditioning_layer(op, self.engine.num_layers)
        state = self.engine.open(prompt, settings, codec, op.seed if op.HasField("seed") else None, op.epoch)
        state.report_target_prob = op.report_target_prob
        state.span_stop_ids = (frozenset(check_ids(op.span_stop_ids, n, "Open.span_stop_ids"))
                               | self.engine.ids_containing(check_stop_chars(op.span_stop_chars)))
        try:
            if layer is not None:  # refused before the forward, not by gRPC after it
                check_conditioning_fits(len(prompt), self.engine.hidden_size, layer,
                                        pb.CloudMessage(opened=self._opened(state)).ByteSize(),
                                        self.limits.max_message_bytes)
            self._admit(state)
        except SessionAbort:
            self.engine.close(state)  # never admitted: nothing else will free its cache
            raise
        return state, layer

    def _opened(self, state: SessionState, layer: int | None = None) -> pb.Opened:
        """The session's Opened; with ``layer``, carrying the prompt's hidden states at that layer (LLM-to-SLM
        conditioning), which prefills the prompt now rather than at the first Verify."""
        opened = pb.Opened(session_id=state.session_id, max_context=self.max_context,
                           max_message_bytes=self.limits.max_message_bytes,
                           fingerprint=fingerprint_to_msg(self.engine.fingerprint))
        if layer is not None:
            opened.conditioning = conditioning_to_bytes(self.engine.condition(state, layer))
            opened.conditioning_dim = self.engine.hidden_size
            self.metrics.conditioning_bytes.inc(len(opened.conditioning))
        return opened

    def _verify(self, state: SessionState, v: pb.Verify, expected_seq: int) -> pb.Verdict:
        t_received = time.perf_counter()
        checked = check_verify(v, expected_seq, len(state.context), state.epoch, state.codec, self.engine.id_space,
                               self.max_context, state.span_stop_ids)
        if checked is STALE:  # drafted on a branch a rejection has ended: answer it, change nothing
            self.metrics.stale.inc()
            return pb.Verdict(seq=v.seq, stale=True, epoch=state.epoch,
                              server_seconds=time.perf_counter() - t_received)
        if checked.step is not None:
            outcome = self.engine.judge(state, checked.pending, checked.step)
            self.metrics.steps.labels("accepted" if outcome.step_accepted else "regenerated").inc()
        else:
            outcome = self.engine.verify(state, checked.pending, checked.block, checked.span)
            self.metrics.accepted.inc(outcome.accepted_count)
            self.metrics.drafts.inc(len(checked.block))
        seconds = time.perf_counter() - t_received
        self.metrics.verifies.inc()
        self.metrics.span_tokens.inc(len(outcome.span_ids))
        self.metrics.verify_seconds.observe(seconds)
        return pb.Verdict(seq=v.seq, accepted=outcome.accepted, token_id=outcome.token,
                          accepted_count=outcome.accepted_count, epoch=state.epoch,
                          target_probs=outcome.target_probs if state.report_target_prob else [],
                          server_seconds=seconds, queue_seconds=outcome.queue_seconds, span_ids=outcome.span_ids,
                          step_accepted=outcome.step_accepted, step_score=outcome.step_score)

    def _after_close(self, inbox: Inbox) -> None:
        """After Close the client may only half-close; anything else it sends is an order error."""
        try:
            msg = inbox.get(timeout=min(self.limits.idle_timeout_s, 5.0))
        except queue.Empty:
            return
        if msg is not Inbox.END:
            raise SessionAbort(ORDER, "message after Close: a closed session takes nothing more; open a new stream",
                               "order")

    def Session(self, request_iterator, context):
        inbox, state = Inbox(request_iterator), None
        try:
            with self._awaiting_open(inbox):
                first = self._next(inbox, "Open", opening=True)
                if first is None:
                    return
                state, layer = self._open(first)
            log.info("session opened", extra={"session": state.session_id, "peer": context.peer(),
                                               "prompt_tokens": len(state.context), "conditioning_layer": layer})
            yield pb.CloudMessage(opened=self._opened(state, layer))
            expected = 1
            while (msg := self._next(inbox, "Verify or Close")) is not None:
                kind = msg.WhichOneof("kind")
                if kind == "close":
                    self._release(state)
                    self._after_close(inbox)
                    return
                if kind != "verify":
                    raise SessionAbort(ORDER, "second Open in one session: one stream carries one session; open a "
                                       "new stream" if kind == "open" else "empty EdgeMessage: set open, verify or "
                                       "close", "order")
                yield pb.CloudMessage(verdict=self._verify(state, msg.verify, expected))
                expected += 1
        except SessionAbort as exc:
            self._count_abort(exc)
            log.info("session ended", extra={"session": state.session_id if state else None, "peer": context.peer(),
                                              "code": exc.code.name, "reason": exc.reason, "detail": str(exc)})
            context.abort(exc.code, str(exc))
        finally:
            if state is not None:
                self._release(state)
                log.info("session closed", extra={"session": state.session_id, "verifies": state.verifies,
                                                  "accepted": state.accepted})

    def _count_abort(self, exc: SessionAbort) -> None:
        if exc.reason in EVICTION_REASONS:
            self.metrics.evictions.labels(exc.reason).inc()
        else:
            self.metrics.rejected.labels(exc.reason).inc()

    # -- Generate (cloud-only baseline) -----------------------------------------------------------------
    def Generate(self, request, context):
        try:
            self._check_serving()
            if isinstance(request, Unparseable):
                raise SessionAbort(INVALID, f"not a valid hybrid.v1.GenerateRequest ({request.error})", "parse")
            check_fingerprint(request.fingerprint, self.engine.fingerprint, "GenerateRequest")
            settings = check_sampling(request.sampling, self.engine.id_space, "GenerateRequest")
            prompt = check_prompt(request.prompt_ids, self.engine.id_space, self.max_context,
                                  "GenerateRequest.prompt_ids", extra=request.max_new_tokens)
            stop_ids = set(check_ids(request.stop_ids, self.engine.id_space, "GenerateRequest.stop_ids"))
            seed = request.seed if request.HasField("seed") else None
            with self._generating():
                self.metrics.generates.inc()
                for token in self.engine.generate(prompt, settings, seed, request.max_new_tokens, stop_ids):
                    if not context.is_active():
                        return
                    self._check_serving()  # draining: UNAVAILABLE, never a silently truncated OK
                    yield pb.GenerateChunk(token_ids=[token])
        except SessionAbort as exc:
            self._count_abort(exc)
            context.abort(exc.code, str(exc))


def _verifier_handlers(servicer: VerifierServicer) -> grpc.GenericRpcHandler:
    """The Verifier service, registered like the generated ``add_VerifierServicer_to_server`` but with
    tolerant request parsing (see ``Unparseable``)."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session, request_deserializer=_tolerant(pb.EdgeMessage),
            response_serializer=pb.CloudMessage.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


@dataclass
class VerifierServer:
    server: grpc.Server
    port: int
    servicer: VerifierServicer
    health: health.HealthServicer

    def drain_and_stop(self) -> None:
        """Graceful stop: refuse new work, answer what is in flight, end sessions, exit after the grace."""
        log.warning("draining: no new sessions; open sessions end at their next message")
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.draining.set()
        self.server.stop(grace=self.servicer.limits.shutdown_grace_s).wait()


def build_server(engine: VerifierModel, address: str, limits: ServerLimits = ServerLimits(),
                 metrics: VerifierMetrics | None = None, credentials: grpc.ServerCredentials | None = None,
                 tokens: TokenStore | None = None) -> VerifierServer:
    """A not-yet-started server with the Verifier, health and reflection services, bound to ``address``."""
    metrics = metrics or VerifierMetrics()
    # A thread per session or Generate call (max_sessions together), per stream still to send Open
    # (max_pending_opens, each for at most open_timeout_s), and a reserve that keeps health checks, reflection
    # and the refusals themselves answerable whatever the clients do; past that, gRPC itself answers
    # RESOURCE_EXHAUSTED instead of queueing calls that would never be served in time.
    workers = limits.max_sessions + limits.max_pending_opens + 16
    # Calls past the workers wait for one (a stream evicted before Open frees its worker at once) rather than
    # being refused outright: a burst of streams that never open must not refuse a health check.
    max_calls = 8 * workers
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes)]
    interceptors = [TokenAuthInterceptor(tokens, lambda reason: metrics.rejected.labels(reason).inc())] if tokens else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         interceptors=interceptors, maximum_concurrent_rpcs=max_calls)
    servicer = VerifierServicer(engine, limits, metrics)
    metrics.registry.register(EngineCollector(engine))
    server.add_generic_rpc_handlers((_verifier_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return VerifierServer(server, port, servicer, health_servicer)


def serve(built: VerifierServer, host: str, ready_line: bool = True) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see ``VerifierServer.drain_and_stop``)."""
    built.server.start()
    if ready_line:
        print(f"{VERIFIER_READY}{host}:{built.port}", flush=True)  # tests and scripts wait for this line
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    stop.wait()
    built.drain_and_stop()

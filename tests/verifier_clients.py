"""Clients for the robustness tests: a raw stream that sends arbitrary bytes, a well-behaved generation
run in a thread, and readers of the verifier's health and Prometheus metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.client import VerifierSession
from edge.hybrid import HybridConfig, generate_hybrid
from core.sampling import SamplingSettings
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec

PROMPT = "Q:7+5-3+8 A:"
SESSION_METHOD = "/hybrid.v1.Verifier/Session"
GENERATE_METHOD = "/hybrid.v1.Verifier/Generate"


def _bytes(m) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


def raw_session(channel: grpc.Channel, messages, hold_open_s: float = 0.0, timeout: float = 30.0):
    """Send ``messages`` (EdgeMessages or raw bytes) on one Session stream, then keep it open for
    ``hold_open_s`` before half-closing; returns (status code, details, responses)."""
    call = channel.stream_stream(SESSION_METHOD, request_serializer=_bytes,
                                 response_deserializer=pb.CloudMessage.FromString)

    def requests():
        yield from messages
        time.sleep(hold_open_s)

    responses = []
    try:
        for response in call(requests(), timeout=timeout):
            responses.append(response)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), responses
    return grpc.StatusCode.OK, "", responses


def raw_generate(channel: grpc.Channel, request, timeout: float = 30.0):
    call = channel.unary_stream(GENERATE_METHOD, request_serializer=_bytes,
                                response_deserializer=pb.GenerateChunk.FromString)
    try:
        chunks = list(call(request, timeout=timeout))
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), []
    return grpc.StatusCode.OK, "", chunks


def is_serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample from the verifier's Prometheus endpoint (0 when the series does not exist yet)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.findall(pattern, text, flags=re.M)
    return float(found[0]) if found else 0.0


GOOD_CONFIG = HybridConfig(threshold=0.01, estimator="max-prob", codec=CodecSpec("adaptive"),
                           settings=SamplingSettings(temperature=1.0), max_new_tokens=48)


class GoodGeneration(threading.Thread):
    """A well-behaved hybrid generation through its own session; ``opened`` is set once its session is
    open, ``token_ids`` / ``error`` hold the outcome."""

    def __init__(self, model, channel: grpc.Channel, seed: int = 11, config: HybridConfig = GOOD_CONFIG):
        super().__init__(daemon=True)
        self.model, self.channel, self.seed, self.config = model, channel, seed, config
        self.opened = threading.Event()
        self.token_ids: list[int] | None = None
        self.error: Exception | None = None

    def _open(self, prompt_ids, settings, codec):
        session = VerifierSession(self.channel, self.model.manifest.fingerprint, prompt_ids, settings, codec,
                                  seed=self.seed)
        self.opened.set()
        return session

    def run(self) -> None:
        try:
            result = generate_hybrid(self.model, self.model.encode(PROMPT), self.config, seed=self.seed,
                                     open_session=self._open)
            self.token_ids = result.token_ids
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.opened.set()

"""The edge refuses, up front and for good, a configuration whose Verify messages cannot fit the verifier's
message limit (``Opened.max_message_bytes``): full32 over a Gemma-3-sized id space (262,144 ids) makes a
1,048,6xx-byte Verify, over gRPC's default 1 MiB. Sent anyway, the server would answer RESOURCE_EXHAUSTED,
which the resilient session takes for a passing overload and retries until "no verifier reachable".

Also the bound itself: ``max_encoded_size`` is at least the size of every payload ``encode`` produces.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.sampling import SamplingSettings
from edge.client import VERIFY_ENVELOPE_BYTES, VerifierError, VerifierSession
from edge.resilient import is_retryable
from proto import hybrid_pb2 as pb
from proto import hybrid_pb2_grpc as pb_grpc
from proto.distribution import CODEC_NAMES, CodecSpec, compress
from proto.payload import encode, max_encoded_size

GEMMA3_N = 262_144
ONE_MIB = 1 << 20


class LimitedVerifier(pb_grpc.VerifierServicer):
    """Opens with an id space and a message limit, accepts every draft."""

    def __init__(self, id_space: int, limit: int):
        self.id_space, self.limit, self.verifies = id_space, limit, 0

    def Session(self, requests, context):
        for message in requests:
            if message.WhichOneof("kind") == "open":
                fp = pb.Fingerprint(tokenizer_hash="abc", id_space=self.id_space, logit_width=self.id_space)
                yield pb.CloudMessage(opened=pb.Opened(session_id="s", fingerprint=fp,
                                                       max_message_bytes=self.limit))
            elif message.WhichOneof("kind") == "verify":
                self.verifies += 1
                yield pb.CloudMessage(verdict=pb.Verdict(seq=message.verify.seq, accepted=True, accepted_count=1,
                                                         token_id=message.verify.block[-1].token_id))


@pytest.fixture
def serve():
    servers = []

    def start(id_space: int, limit: int) -> tuple[grpc.Channel, LimitedVerifier]:
        verifier = LimitedVerifier(id_space, limit)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                             options=[("grpc.max_receive_message_length", 4 * limit)])
        pb_grpc.add_VerifierServicer_to_server(verifier, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return grpc.insecure_channel(f"127.0.0.1:{port}"), verifier

    yield start
    for server in servers:
        server.stop(0)


def _open(channel, n: int, codec: CodecSpec) -> VerifierSession:
    fingerprint = {"tokenizer_hash": "abc", "id_space": n, "logit_width": n}
    session = VerifierSession(channel, fingerprint, [1, 2, 3], SamplingSettings(), codec, timeout=10)
    _ = session.opened  # drafting starts before Opened arrives; its checks run when it does
    return session


def test_full32_over_a_gemma3_id_space_is_refused_before_any_verify(serve):
    channel, verifier = serve(GEMMA3_N, ONE_MIB)
    with pytest.raises(VerifierError, match=r"full32 over 262,144 ids makes Verify messages of up to 1,048,6\d\d "
                                            r"bytes, over the verifier's limit of 1,048,576") as info:
        _open(channel, GEMMA3_N, CodecSpec("full32"))
    assert not is_retryable(info.value) and verifier.verifies == 0


@pytest.mark.parametrize("codec", [CodecSpec("adaptive"), CodecSpec("topk"), CodecSpec("full16")])
def test_codecs_that_fit_are_served_at_the_same_id_space(serve, codec):
    channel, verifier = serve(GEMMA3_N, ONE_MIB)
    session = _open(channel, GEMMA3_N, codec)
    p = np.random.default_rng(0).dirichlet(np.full(GEMMA3_N, 0.01))
    assert session.verify([5, 6], 7, encode(compress(p, codec), codec, GEMMA3_N)).accepted
    session.close()


def test_a_verify_grown_past_the_limit_by_pending_ids_is_refused_not_retried(serve):
    channel, verifier = serve(1000, 4096)
    session = _open(channel, 1000, CodecSpec("adaptive"))
    payload = encode(compress(np.full(1000, 1e-3), CodecSpec("adaptive")), CodecSpec("adaptive"), 1000)
    assert session.verify([999] * 100, 3, payload).accepted
    with pytest.raises(VerifierError, match="exceeds the verifier's limit of 4,096 bytes") as info:
        session.verify([999] * 3000, 3, payload)
    assert not is_retryable(info.value) and verifier.verifies == 1


def test_the_envelope_allowance_covers_a_verify_without_pending_ids():
    big = pb.EdgeMessage(verify=pb.Verify(seq=2**63, position=2**63, epoch=2**63, block=[
        pb.DraftedPosition(token_id=2**32 - 1, distribution=b"x" * 2**24)]))
    assert big.ByteSize() - 2**24 <= VERIFY_ENVELOPE_BYTES


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CODEC_NAMES), st.integers(2, 3000), st.floats(0.01, 5.0), st.integers(0, 2**31),
       st.integers(1, 300), st.integers(9, 16))
def test_no_payload_is_larger_than_its_bound(name, vocab, alpha, seed, k_max, bits):
    spec = CodecSpec(name, k=min(k_max, 255), k_max=k_max, bits=bits)
    p = np.random.default_rng(seed).dirichlet(np.full(vocab, alpha))
    assert len(encode(compress(p, spec), spec, vocab)) <= max_encoded_size(spec, vocab)


def test_the_bound_is_exact_for_the_full_codecs():
    vocab = 1 << 15
    for name in ("full32", "full16"):
        spec = CodecSpec(name)
        assert len(encode(compress(np.full(vocab, 1 / vocab), spec), spec, vocab)) == max_encoded_size(spec, vocab)

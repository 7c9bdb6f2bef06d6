"""The edge refuses a verifier that does not share its id space: an older one that pairs on logit widths
(its Opened fingerprint has no id_space) or one that returns an id past N. A retry cannot fix either."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from core.sampling import SamplingSettings
from edge.client import VerifierError, VerifierSession
from edge.resilient import is_retryable
from proto import hybrid_pb2 as pb
from proto import hybrid_pb2_grpc as pb_grpc
from proto.distribution import CodecSpec

N = 100
FINGERPRINT = {"tokenizer_hash": "abc", "id_space": N, "logit_width": 128}


class FakeVerifier(pb_grpc.VerifierServicer):
    """Opens with the given id space and answers every Verify with ``token``."""

    def __init__(self, id_space: int, token: int):
        self.id_space, self.token = id_space, token

    def Session(self, requests, context):
        for message in requests:
            if message.WhichOneof("kind") == "open":
                fp = pb.Fingerprint(vocab_size=128, tokenizer_hash="abc", id_space=self.id_space)
                yield pb.CloudMessage(opened=pb.Opened(session_id="s", fingerprint=fp))
            elif message.WhichOneof("kind") == "verify":
                yield pb.CloudMessage(verdict=pb.Verdict(seq=message.verify.seq, accepted=False, token_id=self.token))


@pytest.fixture
def serve():
    servers = []

    def start(id_space: int, token: int) -> grpc.Channel:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_VerifierServicer_to_server(FakeVerifier(id_space, token), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return grpc.insecure_channel(f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(0)


def _open(channel) -> VerifierSession:
    session = VerifierSession(channel, FINGERPRINT, [1, 2, 3], SamplingSettings(), CodecSpec("adaptive"), timeout=10)
    _ = session.opened  # drafting starts before Opened arrives; its checks run when it does
    return session


def test_a_verifier_without_id_space_is_refused(serve):
    with pytest.raises(VerifierError, match="predates id-space pairing") as info:
        _open(serve(id_space=0, token=5))
    assert not is_retryable(info.value)


def test_a_returned_padding_id_is_refused(serve):
    session = _open(serve(id_space=N, token=N + 3))  # a padding row of a 128-wide output layer
    with pytest.raises(VerifierError, match=f"outside the id space {N}") as info:
        session.verify([], 7, b"\x01\x07")
    assert not is_retryable(info.value)


def test_a_matching_verifier_is_served(serve):
    session = _open(serve(id_space=N, token=N - 1))
    assert session.verify([], 7, b"\x01\x07").token == N - 1
    session.close()

"""Hostile clients against a live verifier: each malformed or out-of-order input gets its own gRPC status
with an actionable message, ends only its own call, and a well-behaved session running at the same
time finishes with exactly the output it has when alone."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from core.process import VerifierProcess
from edge.client import connect
from edge.model import EdgeModel
from core.sampling import softmax
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec, compress
from proto.payload import encode
from proto.messages import PROTOCOL_VERSION, codec_to_msg, fingerprint_to_msg
from tests.conftest import DEMO_PAIR
from tests.test_codec import topk_bytes
from tests.verifier_clients import GoodGeneration, is_serving, metric, raw_generate, raw_session

pytestmark = pytest.mark.hostile

V = 32000
MAX_SESSIONS, IDLE_S, MAX_CONTEXT, MAX_MESSAGE = 6, 3.0, 128, 200_000
OPEN_S, MAX_PENDING = 2.0, 10  # the open timeout and the streams that may wait to send Open
INVALID, ORDER = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def verifier():
    args = ("--max-sessions", str(MAX_SESSIONS), "--idle-timeout", str(IDLE_S), "--max-context", str(MAX_CONTEXT),
            "--max-message-bytes", str(MAX_MESSAGE), "--metrics-port", "0", "--open-timeout", str(OPEN_S),
            "--max-pending-opens", str(MAX_PENDING))
    with VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(verifier):
    ch = connect(verifier.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def model(slm_onnx):
    return EdgeModel(slm_onnx, providers="cpu")


@pytest.fixture(scope="module")
def reference(model, channel):
    """The well-behaved generation's output with the verifier to itself."""
    run = GoodGeneration(model, channel)
    run.run()
    assert run.error is None and run.token_ids
    return run.token_ids


# -- message builders ---------------------------------------------------------------------------------
FULL32 = CodecSpec("full32")
P = softmax(np.random.default_rng(0).normal(size=V) * 3)  # [V] a valid distribution
DRAFT = int(np.argmax(P))


def fingerprint(model, **change) -> pb.Fingerprint:
    return fingerprint_to_msg({**model.manifest.fingerprint, **change})


def pre_id_space_fingerprint(model) -> pb.Fingerprint:
    """What a client from before id-space pairing sent: the logit width in field 1, no id_space."""
    return pb.Fingerprint(vocab_size=model.manifest.logit_width, tokenizer_hash=model.manifest.tokenizer_hash)


def open_msg(model, codec: CodecSpec | pb.Codec = FULL32, prompt=(5, 6, 7), **fields) -> pb.EdgeMessage:
    codec = codec if isinstance(codec, pb.Codec) else codec_to_msg(codec)
    defaults = dict(fingerprint=fingerprint(model), sampling=pb.Sampling(temperature=1.0), prompt_ids=list(prompt),
                    codec=codec, seed=1, protocol=PROTOCOL_VERSION)
    return pb.EdgeMessage(open=pb.Open(**{**defaults, **fields}))


def full32(values: np.ndarray) -> bytes:
    return values.astype("<f4").tobytes()


def verify_msg(seq=1, pending=(), draft=DRAFT, distribution: bytes | None = None, position=3, epoch=0,
               drafts=1, **fields) -> pb.EdgeMessage:
    """A Verify of ``drafts`` drafted positions (each ``draft`` with ``distribution``) after the default
    3-token prompt."""
    payload = encode(compress(P, FULL32), FULL32, V) if distribution is None else distribution
    block = [pb.DraftedPosition(token_id=draft, distribution=payload)] * drafts
    return pb.EdgeMessage(verify=pb.Verify(seq=seq, pending_ids=list(pending), position=position, epoch=epoch,
                                           block=block, **fields))


CLOSE = pb.EdgeMessage(close=pb.Close())


def negative_prompt_id_open(model) -> bytes:
    """An Open whose prompt holds -1, encoded as a 10-byte varint (what a client with int32/int64 ids sends)."""
    base = open_msg(model, prompt=()).SerializeToString()
    inner = pb.EdgeMessage.FromString(base).open.SerializeToString() + b"\x18" + b"\xff" * 9 + b"\x01"
    return b"\x0a" + _varint(len(inner)) + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _with(values: dict[int, float]) -> bytes:
    p = P.astype(np.float32).copy()
    for i, v in values.items():
        p[i] = v
    return full32(p)


def topk_bad_sum() -> bytes:
    return topk_bytes([3, 10], [200, 54])  # counts sum to 254, not 255


def _zero_at_draft() -> bytes:
    p = P.copy()
    p[DRAFT] = 0
    return full32(p / p.sum())


# name -> (messages or a callable(model) returning them, expected code, a word the message must contain)
SESSION_CASES = {
    "wrong tokenizer hash": (lambda m: [open_msg(m, fingerprint=fingerprint(m, tokenizer_hash="0" * 64))], ORDER,
                             "tokenizer"),
    "wrong id space": (lambda m: [open_msg(m, fingerprint=fingerprint(m, id_space=V + 1))], ORDER, "id_space"),
    "client that predates id-space pairing": (lambda m: [open_msg(m, fingerprint=pre_id_space_fingerprint(m))],
                                              ORDER, "must be upgraded"),
    "prompt id out of range": (lambda m: [open_msg(m, prompt=(5, V))], INVALID, "outside the vocabulary"),
    "negative prompt id": (lambda m: [negative_prompt_id_open(m)], INVALID, "outside the vocabulary"),
    "empty prompt": (lambda m: [open_msg(m, prompt=())], INVALID, "empty"),
    "prompt over the context limit": (lambda m: [open_msg(m, prompt=[5] * MAX_CONTEXT)], INVALID, "context limit"),
    "unknown codec": (lambda m: [open_msg(m, codec=pb.Codec(name="zstd"))], INVALID, "unknown codec"),
    "k > vocabulary": (lambda m: [open_msg(m, codec=pb.Codec(name="adaptive", k=30, eps=0.01, k_max=40000,
                                                             bits=16))], INVALID, "vocabulary"),
    "topk k = 0": (lambda m: [open_msg(m, codec=pb.Codec(name="topk", k=0))], INVALID, "k must be"),
    "NaN temperature": (lambda m: [open_msg(m, sampling=pb.Sampling(temperature=float("nan")))], INVALID,
                        "temperature"),
    "negative temperature": (lambda m: [open_msg(m, sampling=pb.Sampling(temperature=-1))], INVALID, "temperature"),
    "top_p above 1": (lambda m: [open_msg(m, sampling=pb.Sampling(temperature=1, top_p=1.5))], INVALID, "top_p"),
    "top_k above vocabulary": (lambda m: [open_msg(m, sampling=pb.Sampling(temperature=1, top_k=V + 5))], INVALID,
                               "top_k"),
    "Verify before Open": (lambda m: [verify_msg()], ORDER, "must start with Open"),
    "Close before Open": (lambda m: [CLOSE], ORDER, "must start with Open"),
    "empty first message": (lambda m: [pb.EdgeMessage()], ORDER, "must start with Open"),
    "bytes that are not protobuf": (lambda m: [b"\xff\xff\xff\xff"], INVALID, "not a valid"),
    "double Open": (lambda m: [open_msg(m), open_msg(m)], ORDER, "second Open"),
    "Verify after Close": (lambda m: [open_msg(m), CLOSE, verify_msg()], ORDER, "after Close"),
    "out-of-order seq": (lambda m: [open_msg(m), verify_msg(seq=5)], INVALID, "seq"),
    "draft id out of range": (lambda m: [open_msg(m), verify_msg(draft=V + 7)], INVALID, "block[0].token_id"),
    "pending id out of range": (lambda m: [open_msg(m), verify_msg(pending=(1, 2**31))], INVALID, "pending_ids"),
    "oversized pending list": (lambda m: [open_msg(m), verify_msg(pending=[5] * MAX_CONTEXT)], INVALID,
                               "context limit"),
    "NaN probability": (lambda m: [open_msg(m), verify_msg(distribution=_with({3: float("nan")}))], INVALID,
                        "finite"),
    "negative probability": (lambda m: [open_msg(m), verify_msg(distribution=_with({3: -0.01}))], INVALID,
                             "negative"),
    "unnormalized probabilities": (lambda m: [open_msg(m), verify_msg(distribution=full32(P * 0.5))], INVALID,
                                   "sum to 1"),
    "all-zero distribution": (lambda m: [open_msg(m), verify_msg(distribution=full32(np.zeros(V)))], INVALID,
                              "zero"),
    "distribution of the wrong length": (lambda m: [open_msg(m), verify_msg(distribution=full32(P[:-1]))], INVALID,
                                         "Verify.block[0].distribution"),
    "empty distribution": (lambda m: [open_msg(m), verify_msg(distribution=b"")], INVALID,
                           "Verify.block[0].distribution"),
    "draft outside the sent support": (lambda m: [open_msg(m), verify_msg(distribution=_zero_at_draft())], INVALID,
                                       "probability 0"),
    "truncated adaptive payload": (lambda m: [open_msg(m, codec=CodecSpec("adaptive")),
                                              verify_msg(distribution=b"\x05\x01")], INVALID, "truncated"),
    "topk counts not summing to 255": (lambda m: [open_msg(m, codec=CodecSpec("topk", k=2)),
                                                  verify_msg(draft=3, distribution=topk_bad_sum())], INVALID, "sum"),
    "oversized message": (lambda m: [open_msg(m), verify_msg(distribution=b"\0" * (MAX_MESSAGE + 1000))],
                          EXHAUSTED, ""),
    # protocol v2: versions, positions, epochs, blocks, and the fields reserved for later modes
    "protocol-1 client": (lambda m: [open_msg(m, protocol=0)], ORDER, "upgrade the edge"),
    "protocol from the future": (lambda m: [open_msg(m, protocol=PROTOCOL_VERSION + 1)], ORDER,
                                 "upgrade the verifier"),
    # LLM-to-SLM prompt conditioning: the demo LLM has 4 decoder layers, so hidden_states[0..4] may be asked for
    "conditioning layer past the LLM's layers": (lambda m: [open_msg(m, conditioning_layer=5)], INVALID,
                                                 "0 (the embeddings) to 4"),
    "position behind the agreed text": (lambda m: [open_msg(m), verify_msg(position=2)], INVALID, "position"),
    "position past the agreed text": (lambda m: [open_msg(m), verify_msg(position=2**40)], INVALID, "position"),
    "epoch from the future": (lambda m: [open_msg(m), verify_msg(epoch=1)], INVALID, "epoch"),
    "empty block": (lambda m: [open_msg(m), verify_msg(drafts=0)], INVALID, "block is empty"),
    "block past the context limit": (lambda m: [open_msg(m), verify_msg(distribution=topk_bytes([DRAFT], [255]),
                                                                         drafts=MAX_CONTEXT)], INVALID,
                                     "context limit"),
    "bad distribution in a later drafted position": (
        lambda m: [open_msg(m, codec=CodecSpec("topk", k=2)), pb.EdgeMessage(verify=pb.Verify(seq=1, position=3, block=[
            pb.DraftedPosition(token_id=3, distribution=topk_bytes([3, 10], [200, 55])),
            pb.DraftedPosition(token_id=3, distribution=topk_bad_sum())]))], INVALID, "block[1].distribution"),
    # spans and judged steps
    "span of 0 tokens": (lambda m: [open_msg(m), verify_msg(span=pb.SpanRequest(max_tokens=0))], INVALID,
                         "max_tokens is 0"),
    "span stop id out of range": (lambda m: [open_msg(m), verify_msg(span=pb.SpanRequest(max_tokens=4,
                                                                                         stop_ids=[V + 9]))],
                                  INVALID, "span.stop_ids"),
    "Open span stop id out of range": (lambda m: [open_msg(m, span_stop_ids=[3, V + 2])], INVALID,
                                       "Open.span_stop_ids"),
    "Open span stop characters too many": (lambda m: [open_msg(m, span_stop_chars=";" * 40)], INVALID,
                                           "span_stop_chars"),
    "span at the context limit": (lambda m: [open_msg(m), verify_msg(pending=[5] * (MAX_CONTEXT - 3), drafts=0,
                                                                     span=pb.SpanRequest(max_tokens=4))],
                                  INVALID, "context limit"),
    "step with a block": (lambda m: [open_msg(m), verify_msg(step=pb.StepToJudge(
        step_ids=[5], score="min", threshold=0.5, regenerate=pb.SpanRequest(max_tokens=4)))], INVALID,
                          "no block"),
    "empty step": (lambda m: [open_msg(m), verify_msg(drafts=0, step=pb.StepToJudge(
        score="min", threshold=0.5, regenerate=pb.SpanRequest(max_tokens=4)))], INVALID, "step_ids is empty"),
    "unknown step score": (lambda m: [open_msg(m), verify_msg(drafts=0, step=pb.StepToJudge(
        step_ids=[5], score="z" * 5000, threshold=0.5, regenerate=pb.SpanRequest(max_tokens=4)))], INVALID,
                           "characters"),
    "NaN step threshold": (lambda m: [open_msg(m), verify_msg(drafts=0, step=pb.StepToJudge(
        step_ids=[5], score="mean", threshold=float("nan"), regenerate=pb.SpanRequest(max_tokens=4)))], INVALID,
                           "threshold"),
    "step id out of range": (lambda m: [open_msg(m), verify_msg(drafts=0, step=pb.StepToJudge(
        step_ids=[5, V], score="mean", threshold=0.5, regenerate=pb.SpanRequest(max_tokens=4)))], INVALID,
                             "step_ids"),
    "step without a regeneration budget": (lambda m: [open_msg(m), verify_msg(drafts=0, step=pb.StepToJudge(
        step_ids=[5], score="mean", threshold=0.5))], INVALID, "regenerate.max_tokens"),
    # echoed values are truncated: a huge one must not turn the status into "metadata size exceeds hard limit"
    "20 kB codec name": (lambda m: [open_msg(m, codec=pb.Codec(name="z" * 20_000))], INVALID, "20,002 characters"),
    "150 kB tokenizer hash": (lambda m: [open_msg(m, fingerprint=fingerprint(m, tokenizer_hash="f" * 150_000))],
                              ORDER, "not a tokenizer hash"),
}


def generate_request(model, **fields) -> pb.GenerateRequest:
    defaults = dict(fingerprint=fingerprint(model), sampling=pb.Sampling(temperature=1.0), prompt_ids=[5, 6, 7],
                    max_new_tokens=4)
    return pb.GenerateRequest(**{**defaults, **fields})


GENERATE_CASES = {
    "Generate: wrong fingerprint": (lambda m: generate_request(m, fingerprint=fingerprint(m, tokenizer_hash="ab")),
                                    ORDER, "tokenizer"),
    "Generate: prompt id out of range": (lambda m: generate_request(m, prompt_ids=[V + 1]), INVALID, "vocabulary"),
    "Generate: past the context limit": (lambda m: generate_request(m, max_new_tokens=MAX_CONTEXT), INVALID,
                                         "context limit"),
    "Generate: bytes that are not protobuf": (lambda m: b"\x0a\xff", INVALID, "not a valid"),
    "Generate: stop id out of range": (lambda m: generate_request(m, stop_ids=[2, V + 3]), INVALID, "stop_ids"),
}


def _alongside_good_session(model, channel, reference, hostile):
    """Run ``hostile()`` while a well-behaved generation is in flight; check the server stays healthy
    and the good session's output is exactly its solo output. Returns what ``hostile`` returned."""
    good = GoodGeneration(model, channel)
    good.start()
    assert good.opened.wait(60)
    outcome = hostile()
    good.join(120)
    assert not good.is_alive() and good.error is None, good.error
    assert good.token_ids == reference
    assert is_serving(channel)
    return outcome


@pytest.mark.parametrize("name", [*SESSION_CASES, *GENERATE_CASES])
def test_hostile_input(name, model, channel, reference):
    raw_call, cases = (raw_session, SESSION_CASES) if name in SESSION_CASES else (raw_generate, GENERATE_CASES)
    build, expected, words = cases[name]
    code, details, _ = _alongside_good_session(model, channel, reference, lambda: raw_call(channel, build(model)))
    assert code == expected, details
    assert words.lower() in details.lower()


def test_every_refusal_fits_in_a_status(model, channel):
    """Details stay short whatever the client sent (the server caps them), so the client reads the message."""
    for name in ("20 kB codec name", "150 kB tokenizer hash"):
        code, details, _ = raw_session(channel, SESSION_CASES[name][0](model))
        assert code in (INVALID, ORDER) and len(details) < 1100, name


def test_full32_open_with_only_its_name_is_served(model, channel):
    """proto3 leaves unused codec fields at 0: parameters full32 does not read are not validated for it."""
    code, details, responses = raw_session(channel, [open_msg(model, codec=pb.Codec(name="full32")), verify_msg(),
                                                     CLOSE])
    assert code == grpc.StatusCode.OK, details
    assert responses[1].verdict.seq == 1


def test_streams_that_never_open_cannot_lock_out_sessions_or_health(model, channel, reference, verifier):
    """40 streams that send nothing (4x the pending-Open allowance) while a good session runs: health checks
    answer and a new session opens and verifies during the flood; each silent stream is evicted (the oldest
    first, RESOURCE_EXHAUSTED) or timed out (DEADLINE_EXCEEDED) within the open timeout, none waits for the
    60 s idle timeout."""
    hold = threading.Event()
    results: list = []

    def silent():
        def nothing():
            hold.wait(OPEN_S + 5)
            return
            yield  # a generator that sends no message
        results.append(raw_session(channel, nothing(), timeout=OPEN_S + 10))

    def flood():
        threads = [threading.Thread(target=silent, daemon=True) for _ in range(4 * MAX_PENDING)]
        for t in threads:
            t.start()
        during = (is_serving(channel),
                  raw_session(channel, [open_msg(model), verify_msg(), CLOSE])[:2])  # a newcomer, mid-flood
        for t in threads:
            t.join(OPEN_S + 15)
        hold.set()
        return during

    serving, newcomer = _alongside_good_session(model, channel, reference, flood)
    assert serving and newcomer[0] == grpc.StatusCode.OK, newcomer
    assert len(results) == 4 * MAX_PENDING
    assert all(code in (EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED) for code, _, _ in results)
    assert any("evicted before Open" in details for _, details, _ in results)


def test_stream_left_idle_is_evicted(model, channel, reference, verifier):
    before = metric(verifier.metrics_url, "verifier_evictions_total", 'reason="idle"')
    code, details, responses = _alongside_good_session(
        model, channel, reference, lambda: raw_session(channel, [open_msg(model)], hold_open_s=IDLE_S + 3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in details, details
    assert responses and responses[0].WhichOneof("kind") == "opened"  # it was a real session, then evicted
    assert metric(verifier.metrics_url, "verifier_evictions_total", 'reason="idle"') == before + 1


def _flood_past_the_limit(model, channel) -> list:
    """Open MAX_SESSIONS + 2 sessions and hold them until at least two are refused (bounded waits), then
    release them all; returns each session's (code, details, responses)."""
    release = threading.Event()
    results: list = []

    def held_session():
        def messages():
            yield open_msg(model)
            release.wait(30)
        results.append(raw_session(channel, messages()))

    threads = []
    for _ in range(MAX_SESSIONS + 2):  # bounded: the limit must bite within this many
        threads.append(threading.Thread(target=held_session, daemon=True))
        threads[-1].start()
    pause = threading.Event()
    for _ in range(200):  # wait (bounded) until the refusals are in
        if sum(r[0] == EXHAUSTED for r in results) >= 2:
            break
        pause.wait(0.1)
    release.set()
    for t in threads:
        t.join(60)
    return results


def test_flood_of_sessions_past_the_limit(model, channel, reference, verifier):
    """With the good session open, sessions are opened and held until one is refused: the limit holds."""
    out = _alongside_good_session(model, channel, reference, lambda: _flood_past_the_limit(model, channel))
    refused = [r for r in out if r[0] == EXHAUSTED]
    assert len(refused) >= 2 and all("limit of 6 concurrent sessions" in r[1] for r in refused)
    assert all(r[0] in (EXHAUSTED, grpc.StatusCode.OK) for r in out)


def _sessions_gauge_settles_at_zero(url: str) -> bool:
    """The gauge drops when the server's handler has finished, which may be just after the client saw the
    status: poll it (bounded) instead of reading it once."""
    pause = threading.Event()
    for _ in range(100):
        if metric(url, "verifier_sessions") == 0:
            return True
        pause.wait(0.1)
    return False


# Refusals this test makes itself, by the reason the metric counts them under.
COUNTED = {
    "distribution": ["NaN probability", "negative probability", "unnormalized probabilities", "all-zero distribution",
                     "distribution of the wrong length"],
    "order": ["Verify before Open", "Close before Open", "empty first message", "double Open", "Verify after Close"],
}


def test_every_refusal_is_counted_and_sessions_return_to_zero(model, verifier, channel, reference):
    """Self-contained (it used to count the refusals the tests before it had made, and failed when run
    alone): it makes its own refusals and checks that each one moved its counter by exactly one."""
    url = verifier.metrics_url

    def rejected(reason: str) -> float:
        return metric(url, "verifier_rejected_messages_total", f'reason="{reason}"')

    before = {reason: rejected(reason) for reason in [*COUNTED, "capacity"]}
    for reason, names in COUNTED.items():
        for name in names:
            build, expected, _ = SESSION_CASES[name]
            assert raw_session(channel, build(model))[0] == expected, name
        assert rejected(reason) == before[reason] + len(names), reason
    refused = [r for r in _flood_past_the_limit(model, channel) if r[0] == EXHAUSTED]
    assert len(refused) >= 2
    assert rejected("capacity") == before["capacity"] + len(refused)
    assert _sessions_gauge_settles_at_zero(url)
    assert metric(url, "verifier_verifies_total") > 0  # the reference generation's verifies
    assert is_serving(channel)

"""LLM-to-SLM prompt conditioning (arXiv 2402.16844) on the wire: ``Open.conditioning_layer`` up,
``Opened.conditioning`` (float16 [prompt_len, H]) down, the edge waiting for it before its prefill.

- The verifier's states are transformers' ``hidden_states[k]`` of the prompt (a direct forward of the LLM), up to
  float16 rounding, on the batched engine (padded rows with ragged tails and cached pasts) and with batching off;
  the session goes on exactly as an unconditioned one (same q at its first Verify).
- A layer past the LLM's, or states past the message limit, are refused (INVALID_ARGUMENT, saying what to do)
  while a good session is served.
- The edge opens asking for the manifest's layer, waits for Opened, checks the width and rows, prefills with the
  states; an unconditioned SLM's Open is byte for byte what it was, and it never waits.
- Failover: a session lost before its Opened is reopened asking again; once the states came, a replay does not
  ask for them (the prompt was prefilled once), and goes on.
"""

from __future__ import annotations

import io
import json
from concurrent import futures
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from cloud.batching import ForwardJob
from cloud.engine import VerifierModel
from cloud.kvstore import SessionKV
from cloud.server import ServerLimits, build_server
from core.sampling import SamplingSettings, softmax
from edge.client import VerifierError, VerifierSession, connect
from edge.hybrid import HybridConfig, generate_hybrid
from edge.resilient import Failover, ResilientSession
from proto import hybrid_pb2 as pb
from proto import hybrid_pb2_grpc as pb_grpc
from proto.distribution import CodecSpec, compress
from proto.messages import (PROTOCOL_VERSION, codec_to_msg, conditioning_bytes, conditioning_from_msg,
                            conditioning_to_bytes, fingerprint_to_msg, sampling_to_msg, wire_size)
from proto.payload import encode
from tests.conftest import DEMO_PAIR
from tests.verifier_clients import raw_session

integration = pytest.mark.integration  # loads the demo LLM (in-process servers)

L, H = 4, 128  # the demo LLM's decoder layers and hidden size
PROMPT = [1, 40, 41, 42, 9, 43, 44, 12, 45, 46, 9, 47, 48, 13, 49]  # 15 tokens, the demo's prompt length
SETTINGS = SamplingSettings(temperature=1.0)
CODEC = CodecSpec("adaptive")


def close_to(states: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to float16 rounding (relative 2^-11) of values the size of the reference's."""
    np.testing.assert_allclose(states, reference, rtol=2e-3, atol=2e-3 * float(np.abs(reference).max()))


# -- the verifier ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    torch.set_num_threads(1)
    return {"batched": VerifierModel(str(DEMO_PAIR / "llm"), threads=1),
            "off": VerifierModel(str(DEMO_PAIR / "llm"), threads=1, batching=False)}


def direct_states(engine: VerifierModel, ids: list[int]) -> list[np.ndarray]:
    """hidden_states[0..L] of ``ids`` from a plain transformers forward (no cache, no batch): the reference.
    Run before any session of the test, so no worker forward runs beside it."""
    with torch.inference_mode():
        out = engine.model(torch.tensor([ids]), output_hidden_states=True)
    return [h[0].float().numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def servers(engines):
    """An in-process verifier per engine, and one on the batched engine with a 4 kB message limit."""
    started = {}
    for name, engine, limits in [("batched", engines["batched"], ServerLimits()),
                                 ("off", engines["off"], ServerLimits()),
                                 ("small", engines["batched"], ServerLimits(max_message_bytes=4096))]:
        built = build_server(engine, "127.0.0.1:0", limits)
        built.server.start()
        started[name] = (built, connect(f"127.0.0.1:{built.port}"))
    yield started
    for built, channel in started.values():
        channel.close()
        built.server.stop(None)


def first_verdict(channel, engine, layer: int | None):
    """A session on PROMPT (conditioned at ``layer`` or not) and its first Verify's verdict; (states, verdict)."""
    p = softmax(np.random.default_rng(3).normal(size=engine.id_space) * 2)  # [N]
    payload = encode(compress(p, CODEC), CODEC, engine.id_space)
    session = VerifierSession(channel, engine.fingerprint, PROMPT, SETTINGS, CODEC, seed=5, report_target_prob=True,
                              timeout=60, conditioning_layer=layer)
    states = session.conditioning() if layer is not None else None
    verdict = session.verify([], int(np.argmax(p)), payload)
    session.close()
    return states, verdict


@integration
@pytest.mark.parametrize("name", ["batched", "off"])
def test_opened_carries_the_llms_hidden_states_of_the_prompt(name, engines, servers):
    engine, (_, channel) = engines[name], servers[name]
    reference = direct_states(engine, PROMPT)
    for layer in (0, 2, L):  # the embeddings, a middle layer, the last (after the final norm)
        session = VerifierSession(channel, engine.fingerprint, PROMPT, SETTINGS, CODEC, seed=1, timeout=60,
                                  conditioning_layer=layer)
        states = session.conditioning()
        assert states.shape == (len(PROMPT), H) and session.opened.conditioning_dim == H
        close_to(states, reference[layer])
        session.close()
    # the Open's prefill leaves the session where an unconditioned one is: the same q, the same verdict
    _, plain = first_verdict(channel, engine, None)
    _, conditioned = first_verdict(channel, engine, 2)
    assert (conditioned.token, conditioned.accepted) == (plain.token, plain.accepted)
    assert conditioned.target_prob == pytest.approx(plain.target_prob, rel=1e-5)


@integration
def test_a_padded_batch_keeps_each_rows_own_states(engines):
    """Ragged rows in one padded forward (left padding, one row with a cached past): each conditioned row gets the
    states of its own fed positions, equal to a direct forward's."""
    engine = engines["batched"]
    worker = engine._worker
    a_ids, b_ids, c_ids = PROMPT[:6], PROMPT[:12], PROMPT[:9]
    a_ref, b_ref = direct_states(engine, a_ids), direct_states(engine, b_ids)
    b_kv = SessionKV()
    worker.logits(b_kv, b_ids[:7], rows=1)  # 7 positions cached: row b feeds 5
    jobs = [ForwardJob(SessionKV(), a_ids, rows=1, layer=1), ForwardJob(b_kv, b_ids, rows=1, layer=3),
            ForwardJob(SessionKV(), c_ids, rows=1)]
    with torch.inference_mode():
        worker.forward_batch(jobs)  # on this thread: the model thread is idle
    close_to(jobs[0].hidden, a_ref[1])
    close_to(jobs[1].hidden, b_ref[3][7:])
    assert jobs[2].hidden is None


@integration
def test_bad_layers_and_oversized_states_are_refused_while_a_good_session_is_served(engines, servers):
    engine, (built, channel) = engines["batched"], servers["batched"]
    good = VerifierSession(channel, engine.fingerprint, PROMPT, SETTINGS, CODEC, seed=1, timeout=60,
                           conditioning_layer=L)
    open_msg = pb.Open(fingerprint=fingerprint_to_msg(engine.fingerprint), sampling=sampling_to_msg(SETTINGS),
                       prompt_ids=PROMPT, codec=codec_to_msg(CODEC), protocol=PROTOCOL_VERSION, conditioning_layer=L + 1)
    code, details, _ = raw_session(channel, [pb.EdgeMessage(open=open_msg)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ask for 0 (the embeddings) to 4" in details, details
    # 4 kB limit: 15 x 128 x 2 = 3,840 bytes of states fit, 20 x 128 x 2 = 5,120 do not
    small = servers["small"][1]
    assert VerifierSession(small, engine.fingerprint, PROMPT, SETTINGS, CODEC, timeout=60,
                           conditioning_layer=2).conditioning().shape == (15, H)
    with pytest.raises(VerifierError, match="over the verifier's message limit of 4,096 bytes; shorten the prompt") as err:
        VerifierSession(small, engine.fingerprint, PROMPT + PROMPT[:5], SETTINGS, CODEC, timeout=60,
                        conditioning_layer=2).conditioning()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert good.conditioning().shape == (len(PROMPT), H)  # the good session, served all along
    p = softmax(np.random.default_rng(0).normal(size=engine.id_space))
    assert good.verify([], int(np.argmax(p)), encode(compress(p, CODEC), CODEC, engine.id_space)).wait_seconds > 0
    good.close()
    counted = built.servicer.metrics.registry.get_sample_value("verifier_rejected_messages_total",
                                                               {"reason": "conditioning"})
    assert counted == 1


# -- the edge ------------------------------------------------------------------------------------------
class RecordingRuntime:
    """The ONNX runtime's interface with one fixed logit row; records what prefill was given."""

    def __init__(self, width: int, events: list):
        self.id_space, self.events = width, events
        self.row = np.full(width, -5.0, dtype=np.float32)
        self.row[50] = 5.0  # a confident SLM: token 50 almost surely
        self.cache = SimpleNamespace(length=0)
        self.prefilled: list = []  # the conditioning keyword of each prefill call ("absent": not passed)

    def prefill(self, ids, **kwargs):
        self.events.append("prefill")
        self.prefilled.append(kwargs.get("conditioning", "absent"))
        self.cache.length = len(ids)
        return self.row

    def decode(self, token):
        self.cache.length += 1
        return self.row

    def truncate(self, length):
        self.cache.length = length


def fake_model(width: int, conditioning=None, events: list | None = None):
    """What the loops use of an EdgeModel, with ``conditioning`` as EdgeModel exposes it (layer, dim, input)."""
    return SimpleNamespace(runtime=RecordingRuntime(width, events if events is not None else []), eos_ids=frozenset(),
                           context_full=lambda n: False, decode=lambda ids: "", conditioning=conditioning,
                           manifest=None)


SPEC = SimpleNamespace(layer=2, dim=H, input="llm_hidden")


class FakeVerifier:
    """A verifier session that never gets a Verify (threshold +inf) and hands out given prompt states."""

    report_target_prob, lost, uplink_bytes, downlink_bytes = False, False, 100, 0

    def __init__(self, states, events: list):
        self.states, self.events, self.closed = states, events, False

    def conditioning(self):
        self.events.append("conditioning")
        self.downlink_bytes = 4000
        return self.states

    def submit(self, *args, **kwargs):
        raise AssertionError("nothing is verified at threshold +inf")

    def next_verdict(self, wait=True):
        raise AssertionError("nothing is verified at threshold +inf")

    def close(self):
        self.closed = True


SLM_ONLY = HybridConfig(threshold=float("inf"), max_new_tokens=3, codec=CODEC, settings=SETTINGS)


def opener(states, events: list, opened: list):
    def open_session(prompt_ids, settings, codec, **options):
        events.append(f"open {options}")
        opened.append(FakeVerifier(states, events))
        return opened[-1]
    return open_session


def test_a_conditioned_slm_waits_for_opened_and_prefills_with_its_states():
    events, opened = [], []
    states = np.random.default_rng(0).normal(size=(len(PROMPT), H)).astype(np.float32)
    model = fake_model(64, SPEC, events)
    trace = io.StringIO()
    result = generate_hybrid(model, PROMPT, SLM_ONLY, seed=1, open_session=opener(states, events, opened), trace=trace)
    assert events == ["open {'conditioning_layer': 2}", "conditioning", "prefill"]  # Opened first, then prefill
    assert model.runtime.prefilled == [states] and len(result.token_ids) == 3
    head = json.loads(trace.getvalue().splitlines()[0])
    assert head["conditioning_layer"] == 2 and head["open_wait_s"] == result.open_wait_s > 0
    assert head["downlink_bytes"] == 4000  # the Opened with the states, counted at open


@pytest.mark.parametrize("shape, words", [((len(PROMPT), H + 1), "trained on 128-wide"),
                                          ((len(PROMPT) - 1, H), "14 positions of a 15-token prompt")])
def test_states_of_the_wrong_shape_are_refused_and_the_session_closed(shape, words):
    events, opened = [], []
    with pytest.raises(VerifierError, match=words):
        generate_hybrid(fake_model(64, SPEC, events), PROMPT, SLM_ONLY, seed=1,
                        open_session=opener(np.zeros(shape, np.float32), events, opened))
    assert opened[0].closed and "prefill" not in events


def test_without_a_verifier_or_once_the_cloud_is_lost_the_prompt_is_prefilled_with_zeros():
    alone = fake_model(64, SPEC)
    generate_hybrid(alone, PROMPT, SLM_ONLY, seed=1)
    assert alone.runtime.prefilled == ["absent"]  # the runtime's default: zero rows
    events, opened = [], []
    lost = fake_model(64, SPEC, events)
    generate_hybrid(lost, PROMPT, SLM_ONLY, seed=1, open_session=opener(None, events, opened))
    assert lost.runtime.prefilled == [None]


def test_an_unconditioned_slm_opens_as_before_and_never_waits():
    events, opened = [], []
    model = fake_model(64, None, events)
    generate_hybrid(model, PROMPT, SLM_ONLY, seed=1, open_session=opener(None, events, opened))
    assert "open {}" in events and "conditioning" not in events  # a 3-argument opener still works
    assert model.runtime.prefilled == ["absent"]


def test_a_prompt_whose_states_cannot_reach_the_edge_is_refused_before_opening():
    events, opened = [], []
    with pytest.raises(VerifierError, match="shorten the prompt to at most 4,092 tokens"):
        generate_hybrid(fake_model(64, SPEC, events), [5] * 4100, SLM_ONLY, seed=1,
                        open_session=opener(None, events, opened))
    assert not opened


def test_an_unconditioned_open_is_byte_for_byte_what_it_was():
    """The Open of an unconditioned session has no field 9; a conditioned one adds exactly its two bytes, layer 0
    (the embeddings) included."""
    fingerprint = {"tokenizer_hash": "abc", "id_space": 64, "logit_width": 64}
    channel = grpc.insecure_channel("127.0.0.1:1")  # never reached: only the queued Open is read

    def sent_open(layer):
        session = VerifierSession(channel, fingerprint, PROMPT, SETTINGS, CODEC, seed=7, conditioning_layer=layer)
        return session._requests.get(timeout=5), session.uplink_bytes

    plain, plain_bytes = sent_open(None)
    before = pb.EdgeMessage(open=pb.Open(fingerprint=fingerprint_to_msg(fingerprint), sampling=sampling_to_msg(SETTINGS),
                                         prompt_ids=PROMPT, codec=codec_to_msg(CODEC), seed=7,
                                         protocol=PROTOCOL_VERSION))  # the fields the client set before
    assert plain.SerializeToString() == before.SerializeToString() and plain_bytes == wire_size(before)
    assert not plain.open.HasField("conditioning_layer")
    for layer in (0, 3):
        conditioned, up = sent_open(layer)
        assert conditioned.open.conditioning_layer == layer and up == plain_bytes + 2
    channel.close()


def test_opened_states_round_trip_as_float16_rows():
    states = np.array([[1.0, -2.5], [70000.0, 1e-3]], dtype=np.float32)
    opened = pb.Opened(conditioning=conditioning_to_bytes(states), conditioning_dim=2)
    back = conditioning_from_msg(opened)
    assert back.dtype == np.float32 and len(opened.conditioning) == conditioning_bytes(2, 2) == 8
    assert back[1, 0] == 65504.0  # clamped to float16's largest, not inf
    np.testing.assert_allclose(back[[0, 0, 1], [0, 1, 1]], [1.0, -2.5, 1e-3], rtol=1e-3)
    with pytest.raises(ValueError, match="no conditioning"):
        conditioning_from_msg(pb.Opened())


# -- the edge against the real verifier, failover ------------------------------------------------------
@integration
def test_the_hybrid_loop_prefills_with_the_verifiers_states_and_counts_their_bytes(engines, servers):
    engine, (_, channel) = engines["batched"], servers["batched"]
    reference = direct_states(engine, PROMPT)
    model = fake_model(engine.id_space, SPEC)
    config = HybridConfig(threshold=float("-inf"), max_new_tokens=4, codec=CODEC, settings=SETTINGS)

    def open_session(prompt_ids, settings, codec, conditioning_layer=None):
        return VerifierSession(channel, engine.fingerprint, prompt_ids, settings, codec, seed=3, timeout=60,
                               conditioning_layer=conditioning_layer)

    trace = io.StringIO()
    result = generate_hybrid(model, PROMPT, config, seed=3, open_session=open_session, trace=trace)
    close_to(model.runtime.prefilled[0], reference[2])
    assert len(result.token_ids) == 4 and result.sent == 4  # verified after the conditioned open, as ever
    opened_bytes = json.loads(trace.getvalue().splitlines()[0])["downlink_bytes"]
    assert conditioning_bytes(len(PROMPT), H) < opened_bytes < conditioning_bytes(len(PROMPT), H) + 100
    assert result.downlink_bytes == opened_bytes + sum(r.down_bytes for r in result.records)


class Unavailable(pb_grpc.VerifierServicer):
    """A replica that fails every session before Opened (it is going away)."""

    def Session(self, requests, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "draining")


@integration
def test_failover_asks_again_only_until_the_states_came(engines, servers):
    engine, (built, _) = engines["batched"], servers["batched"]
    dying = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_VerifierServicer_to_server(Unavailable(), dying)
    dying_port = dying.add_insecure_port("127.0.0.1:0")
    dying.start()
    second = build_server(engine, "127.0.0.1:0")
    second.server.start()
    try:
        # lost before Opened: the reopened session (on the next replica) asks again
        session = ResilientSession(Failover((f"127.0.0.1:{dying_port}", f"127.0.0.1:{built.port}"), loss_after_s=30),
                                   engine.fingerprint, PROMPT, SETTINGS, CODEC, seed=3, timeout=60,
                                   conditioning_layer=2)
        states = session.conditioning()
        assert states.shape == (len(PROMPT), H) and session.reconnects == 1
        session.close()
        # the states came: a replay after the replica dies does not ask again, and the session goes on
        session = ResilientSession(Failover((f"127.0.0.1:{second.port}", f"127.0.0.1:{built.port}"), loss_after_s=30),
                                   engine.fingerprint, PROMPT, SETTINGS, CODEC, seed=3, timeout=60,
                                   conditioning_layer=2)
        states = session.conditioning()
        second.server.stop(None).wait()
        p = softmax(np.random.default_rng(1).normal(size=engine.id_space))
        verdict = session.verify([], int(np.argmax(p)), encode(compress(p, CODEC), CODEC, engine.id_space))
        assert verdict is not None and session.reconnects == 1
        assert session._session.conditioning_layer is None  # the replay's Open asked for nothing
        assert session.conditioning() is states  # the edge keeps the ones it prefilled with
        session.close()
    finally:
        dying.stop(None)
        second.server.stop(None)

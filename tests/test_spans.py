"""Spans and judged steps on the wire (protocol v2): span tokens are the LLM's own samples keyed by (seed,
position), a span after a block is the block then a bare span, step judging accepts by its score or
regenerates, and step judging is inexact by design (a constructed case where its output is not the LLM's).

The engine is driven in-process; one test goes through a real verifier process and ``VerifierSession`` so
the client's agreed length and epoch follow spans and steps.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cloud.engine import VerifierModel
from cloud.validate import Span, Step
from core.process import VerifierProcess
from core.sampling import SamplingSettings, next_token, probabilities, softmax
from edge.client import VerifierSession, connect
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec, compress
from proto.payload import encode
from tests.conftest import DEMO_PAIR

SETTINGS = SamplingSettings(temperature=1.0)
CODEC = CodecSpec("adaptive")
PROMPT = [1, 40, 41, 42, 43]


@pytest.fixture(scope="module")
def engine():
    return VerifierModel(str(DEMO_PAIR / "llm"), threads=1)


def logits_after(engine: VerifierModel, context: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return engine.model(torch.tensor([context])).logits[0, -1, : engine.id_space].float().numpy()


def test_a_span_is_the_llms_own_samples_keyed_by_position(engine):
    state = engine.open(PROMPT, SETTINGS, CODEC, seed=11)
    outcome = engine.verify(state, [], [], Span(frozenset(), 12))
    assert len(outcome.span_ids) == 12 and state.context == PROMPT + list(outcome.span_ids)
    assert state.epoch == 1  # the edge did not draft these
    context = list(PROMPT)
    for token in outcome.span_ids:  # the same draws from uncached forwards: rng keyed by (seed, position)
        assert token == next_token(logits_after(engine, context), SETTINGS, np.random.default_rng([11, len(context)]))
        context.append(token)
    again = engine.open(PROMPT, SETTINGS, CODEC, seed=11)
    assert engine.verify(again, [], [], Span(frozenset(), 12)).span_ids == outcome.span_ids
    engine.close(state)
    engine.close(again)


def test_a_span_stops_after_a_stop_id_and_follows_a_block(engine):
    state = engine.open(PROMPT, SETTINGS, CODEC, seed=3)
    free = engine.verify(state, [], [], Span(frozenset(), 20)).span_ids
    stop = free[4]
    state = engine.open(PROMPT, SETTINGS, CODEC, seed=3)
    stopped = engine.verify(state, [], [], Span(frozenset({stop}), 20)).span_ids
    assert stopped == free[: free.index(stop) + 1]
    # A block of one draft then a span = the same block, then a bare span.
    q = probabilities(logits_after(engine, PROMPT), SETTINGS)
    p_tilde = compress(q, CODEC)
    draft = int(np.argmax(q))
    a = engine.open(PROMPT, SETTINGS, CODEC, seed=5)
    joined = engine.verify(a, [7], [(draft, p_tilde)], Span(frozenset(), 6))
    b = engine.open(PROMPT, SETTINGS, CODEC, seed=5)
    engine.verify(b, [7], [(draft, p_tilde)])
    bare = engine.verify(b, [], [], Span(frozenset(), 6))
    assert joined.span_ids == bare.span_ids and a.context == b.context


def test_the_first_span_token_is_distributed_as_the_llm(engine):
    settings = SamplingSettings(temperature=1.0, top_k=5)
    q = probabilities(logits_after(engine, PROMPT), settings)
    def first_span_token(seed: int) -> int:
        state = engine.open(PROMPT, settings, CODEC, seed=seed)
        token = engine.verify(state, [], [], Span(frozenset(), 1)).span_ids[0]
        engine.close(state)
        return token

    counts = np.zeros(len(q))
    with ThreadPoolExecutor(8) as pool:  # concurrent sessions: the engine batches their forwards
        for token in pool.map(first_span_token, range(1500)):
            counts[token] += 1
    support = np.flatnonzero(q)
    assert chisquare(counts[support], q[support] * counts.sum()).pvalue > 1e-3


def ratios(engine: VerifierModel, context: list[int], step: list[int]) -> list[float]:
    out = []
    for i, token in enumerate(step):
        q = softmax(logits_after(engine, context + step[:i]))
        out.append(float(q[token] / q.max()))
    return out


@pytest.mark.parametrize("score", ["min", "mean"])
def test_a_judged_step_is_accepted_by_its_score_or_regenerated(engine, score):
    step = [int(np.argsort(-logits_after(engine, PROMPT))[1]), 50, 51]
    r = ratios(engine, PROMPT, step)
    value = min(r) if score == "min" else float(np.mean(r))
    regenerate = Span(frozenset(), 3)
    state = engine.open(PROMPT, SETTINGS, CODEC, seed=2)
    kept = engine.judge(state, [], Step(step, score, value * 0.999, regenerate))
    assert kept.step_accepted and kept.step_score == pytest.approx(value, rel=1e-4)
    assert state.context == PROMPT + step and state.epoch == 0 and not kept.span_ids
    state = engine.open(PROMPT, SETTINGS, CODEC, seed=2)
    redone = engine.judge(state, [], Step(step, score, min(1.0, value * 1.001 + 1e-6), regenerate))
    assert not redone.step_accepted and len(redone.span_ids) == 3
    assert state.context == PROMPT + list(redone.span_ids) and state.epoch == 1
    fresh = engine.open(PROMPT, SETTINGS, CODEC, seed=2)  # the regeneration is the span from the step's start
    assert engine.verify(fresh, [], [], regenerate).span_ids == redone.span_ids


def test_step_judging_is_inexact_by_design(engine):
    """The edge always drafts the LLM's runner-up; a lenient judge accepts it every time, while the LLM itself
    would pick it with probability q(runner-up) < 1: the output distribution is not the LLM's."""
    q = probabilities(logits_after(engine, PROMPT), SETTINGS)
    runner_up = int(np.argsort(-q)[1])
    threshold = float(q[runner_up] / q.max()) * 0.9
    picks = []
    for seed in range(200):
        state = engine.open(PROMPT, SETTINGS, CODEC, seed=seed)
        engine.judge(state, [], Step([runner_up], "min", threshold, Span(frozenset(), 1)))
        picks.append(state.context[len(PROMPT)])
        engine.close(state)
    assert all(p == runner_up for p in picks)
    assert q[runner_up] < 0.9  # the LLM would have drawn something else at least 10% of the time


def test_spans_and_steps_through_a_verifier_process(slm_onnx):
    from edge.manifest import load_manifest

    fingerprint = load_manifest(slm_onnx).fingerprint
    with VerifierProcess(str(DEMO_PAIR / "llm")) as verifier:
        channel = connect(verifier.address)
        session = VerifierSession(channel, fingerprint, PROMPT, SETTINGS, CODEC, seed=9)
        session.submit([], session.agreed, session.epoch, [], span=pb.SpanRequest(max_tokens=5))
        span = session.next_verdict()
        assert len(span.span_ids) == 5 and session.agreed == len(PROMPT) + 5 and session.epoch == 1
        step = pb.StepToJudge(step_ids=[60, 61], score="mean", threshold=0.0, regenerate=pb.SpanRequest(max_tokens=4))
        session.submit([70], session.agreed, session.epoch, [], step=step)
        judged = session.next_verdict()
        assert judged.step_accepted and session.agreed == len(PROMPT) + 5 + 3 and session.epoch == 1
        strict = pb.StepToJudge(step_ids=[60], score="min", threshold=1.0, regenerate=pb.SpanRequest(max_tokens=4))
        session.submit([], session.agreed, session.epoch, [], step=strict)
        redone = session.next_verdict()
        assert not redone.step_accepted and len(redone.span_ids) == 4 and session.epoch == 2
        assert session.agreed == len(PROMPT) + 5 + 3 + 4
        p = np.zeros(fingerprint["id_space"])
        p[[80, 81]] = 0.5
        session.submit([], session.agreed, session.epoch, [(80, encode(compress(p, CODEC), CODEC, len(p)))],
                       span=pb.SpanRequest(max_tokens=2))
        last = session.next_verdict()
        assert len(last.span_ids) == 2 and session.agreed == len(PROMPT) + 5 + 3 + 4 + 1 + 2
        session.close()
        channel.close()


def test_a_span_without_stop_ids_ends_at_the_sessions_and_its_own_override_them():
    """Open.span_stop_ids are sent once; a SpanRequest naming no stop ids uses them, one naming some uses its own
    (for a bare span and for a judged step's regeneration alike)."""
    from cloud.validate import check_verify

    session = frozenset({7, 9})
    def checked(span=None, step=None):
        v = pb.Verify(seq=1, position=5, span=span, step=step)
        return check_verify(v, 1, 5, 0, CODEC, 100, 64, session)
    assert checked(span=pb.SpanRequest(max_tokens=4)).span == Span(session, 4)
    assert checked(span=pb.SpanRequest(max_tokens=4, stop_ids=[3])).span == Span(frozenset({3}), 4)
    step = pb.StepToJudge(step_ids=[1, 2], score="min", threshold=0.5, regenerate=pb.SpanRequest(max_tokens=8))
    assert checked(step=step).step.regenerate == Span(session, 8)


def test_stop_characters_give_both_sides_the_same_ids(engine):
    """Open.span_stop_chars: the verifier's ids for ';#' are the edge's (its own tokenizers.Tokenizer decode) and
    the span SLM's annotation rule's; the merged tokens (';-', ' #-') are among them."""
    from tokenizers import Tokenizer

    from core.stops import ids_containing
    from models.span_marker import STEP_END_CHARS, step_end_ids

    edge = Tokenizer.from_file(str(DEMO_PAIR / "slm" / "tokenizer.json"))
    on_edge = ids_containing((edge.decode([i], skip_special_tokens=False) for i in range(engine.id_space)), ";#")
    assert engine.ids_containing(";#") == on_edge == step_end_ids(engine.tokenizer)
    assert {";", " #", ";-", " #-"} <= {edge.decode([i]) for i in on_edge} and len(on_edge) > 100
    assert STEP_END_CHARS == frozenset(";#") and engine.ids_containing("") == frozenset()

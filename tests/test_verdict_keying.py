"""A verdict's randomness is keyed by (session seed, position), never by the session's history of calls.

That is what makes failover exact: a reopened session replays the agreed history as its prompt and must
give the verdicts the lost session would have given. The demo pair is so confident that "identical text
after failover" hardly ever depends on the random draw, so here the draft distribution is chosen at each
position so that the draft is accepted with probability 1/2 (and a rejection resamples from a residual
of thousands of tokens): the verdict then really depends on the uniform draws.

The real engine (``cloud.engine.VerifierModel``) on the committed demo LLM, in-process (no server).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.engine import VerifierModel
from core.sampling import SamplingSettings, probabilities
from proto.distribution import CodecSpec, Compressed
from tests.conftest import DEMO_PAIR

SETTINGS = SamplingSettings(temperature=1.5)
CODEC = CodecSpec("full32")
SEED = 2024
POSITIONS = 12


@pytest.fixture(scope="module")
def engine():
    return VerifierModel(str(DEMO_PAIR / "llm"))


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer("Q:7+5-3+8 A:")["input_ids"]


def target(engine: VerifierModel, context: list[int]) -> np.ndarray:
    """q at the position after ``context`` (one uncached forward; independent of any session)."""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([context])).logits[0, -1].float().numpy()
    return probabilities(logits, SETTINGS)


def coin_flip_draft(q: np.ndarray) -> tuple[int, Compressed]:
    """The runner-up y of q as the draft, with p~(y) = 2 q(y) and the rest of p~ on the mode: accepted
    with probability exactly 1/2 however confident q is, and a rejection resamples from q's tail (q minus
    both), thousands of tokens."""
    order = np.argsort(-q, kind="stable")
    mode, y = int(order[0]), int(order[1])
    py = 2.0 * float(q[y])  # <= 1: the runner-up holds at most half the mass
    weights = {mode: 1.0 - py, y: py}
    ids = sorted(weights)
    return y, Compressed(np.array(ids), np.array([weights[i] for i in ids]), 1.0)


@pytest.fixture(scope="module")
def reference(engine, prompt):
    """One session verifying POSITIONS consecutive positions: (drafts, p~s, verdicts)."""
    state = engine.open(prompt, SETTINGS, CODEC, SEED)
    drafts, p_tildes, verdicts = [], [], []
    for _ in range(POSITIONS):
        x, p_tilde = coin_flip_draft(target(engine, state.context))
        outcome = engine.verify(state, [], [(x, p_tilde)])
        drafts.append(x)
        p_tildes.append(p_tilde)
        verdicts.append((outcome.accepted, outcome.token))
    return drafts, p_tildes, verdicts


def test_the_verdicts_really_depend_on_the_randomness(reference):
    """The premise: both outcomes occur, so a wrongly keyed generator would change verdicts."""
    accepted = [a for a, _ in reference[2]]
    assert 0 < sum(accepted) < len(accepted)


def test_a_replayed_session_gives_the_same_verdict_at_each_position(engine, prompt, reference):
    """A session reopened at position k (prompt = the agreed history, as failover does) has made no
    verifies yet, and still gives the verdict the original session gave at k."""
    drafts, p_tildes, verdicts = reference
    history = list(prompt)
    for k in range(POSITIONS):
        state = engine.open(history, SETTINGS, CODEC, SEED)
        outcome = engine.verify(state, [], [(drafts[k], p_tildes[k])])
        assert (outcome.accepted, outcome.token) == verdicts[k], f"position {len(history)}"
        history.append(outcome.token)


def test_pending_ids_do_not_shift_the_randomness(engine, prompt, reference):
    """One session that sends the agreed tokens as pending ids and verifies only every third position:
    fewer verifies than positions, the same verdicts."""
    drafts, p_tildes, verdicts = reference
    tokens = [t for _, t in verdicts]
    state = engine.open(prompt, SETTINGS, CODEC, SEED)
    for k in range(2, POSITIONS, 3):
        pending = tokens[len(state.context) - len(prompt):k]
        outcome = engine.verify(state, pending, [(drafts[k], p_tildes[k])])
        assert (outcome.accepted, outcome.token) == verdicts[k], f"position {len(prompt) + k}"


def test_another_seed_gives_other_verdicts(engine, prompt, reference):
    """The seed does matter (the key is not the position alone)."""
    drafts, p_tildes, verdicts = reference
    history = list(prompt)
    other = []
    for k in range(POSITIONS):
        state = engine.open(history, SETTINGS, CODEC, SEED + 1)
        outcome = engine.verify(state, [], [(drafts[k], p_tildes[k])])
        other.append((outcome.accepted, outcome.token))
        history.append(verdicts[k][1])  # the reference history, so q is the same at every k
    assert other != verdicts


def test_a_block_gives_the_verdicts_of_its_positions_sent_one_by_one(engine, prompt, reference):
    """Protocol v2 blocks: the reference's drafts sent as blocks of up to 4 positions give the same verdicts
    (one forward per block, multi-token speculative sampling): the longest accepted prefix, then the
    reference's token at the first rejection, and the next block starts after it."""
    drafts, p_tildes, verdicts = reference
    state = engine.open(prompt, SETTINGS, CODEC, SEED)
    k = 0
    while k < POSITIONS:
        block = [(drafts[j], p_tildes[j]) for j in range(k, min(k + 4, POSITIONS))]
        outcome = engine.verify(state, [], block)
        decided = outcome.accepted_count + (not outcome.accepted)
        assert all(verdicts[k + j] == (True, drafts[k + j]) for j in range(outcome.accepted_count))
        if not outcome.accepted:
            assert (False, outcome.token) == verdicts[k + outcome.accepted_count]
            assert state.epoch == 1 + sum(not a for a, _ in verdicts[:k + outcome.accepted_count])
        assert state.context == prompt + [t for _, t in verdicts[:k + decided]]
        k += decided
    assert state.cache.length == len(state.context) - 1

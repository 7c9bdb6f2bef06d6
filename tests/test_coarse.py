"""The span and step modes' edge loop (``edge/coarse.py``) against a real verifier, and exactness of the
block path at a later position of a step.

Every mode finishes its problems with text the task can parse, reports its LLM tokens and round trips,
and gives the same tokens when run again with the same seed; step-exact with every position sent is the
exact block path; the engine's block verification at a step's second position follows the LLM (chi-square).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cloud.engine import VerifierModel
from core.process import VerifierProcess
from core.sampling import SamplingSettings, probabilities
from edge.client import VerifierSession, connect
from edge.coarse import MODES, CoarseConfig, generate_coarse
from edge.hybrid import HybridConfig
from edge.model import EdgeModel
from models.task import STEP_END_TEXTS, held_out_problems
from proto.distribution import CodecSpec, Compressed
from tests.conftest import DEMO_PAIR

SETTINGS = SamplingSettings(temperature=1.0)
PROBLEMS = 2


@pytest.fixture(scope="module")
def setup(slm_onnx):
    model = EdgeModel(slm_onnx, threads=1)
    ends = frozenset(i for t in STEP_END_TEXTS for i in model.encode(t, add_special_tokens=False))
    with VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=("--threads", "1")) as verifier:
        channel = connect(verifier.address)
        yield model, ends, channel
        channel.close()


def opener(model, channel, seed):
    return lambda ids, settings, codec, **open_args: VerifierSession(channel, model.manifest.fingerprint, ids,
                                                                     settings, codec, seed=seed, **open_args)


def run(model, channel, config, seed):
    problem = held_out_problems(PROBLEMS)[seed % PROBLEMS]
    return generate_coarse(model, model.encode(problem.prompt), config, seed=seed,
                           open_session=opener(model, channel, seed))


@pytest.mark.parametrize("mode", [m for m in MODES if m != "span-learned"])
def test_each_mode_generates_and_repeats_itself(setup, mode):
    model, ends, channel = setup
    config = CoarseConfig(mode, HybridConfig(threshold=0.02, settings=SETTINGS, max_new_tokens=48), ends)
    for seed in range(PROBLEMS):
        first, again = run(model, channel, config, seed), run(model, channel, config, seed)
        assert first.token_ids == again.token_ids and first.text == again.text
        assert 0 < len(first.token_ids) <= 48
        assert first.round_trips >= 1 and first.uplink_bytes > 0  # threshold 0.02: something is uncertain
        assert 0 <= first.llm_tokens <= len(first.token_ids)


def test_a_span_mode_without_a_verifier_is_the_slm_alone(setup):
    model, ends, _ = setup
    config = CoarseConfig("span-uncertainty", HybridConfig(threshold=0.0, settings=SETTINGS, max_new_tokens=48), ends)
    problem = held_out_problems(1)[0]
    alone = generate_coarse(model, model.encode(problem.prompt), config, seed=1)
    assert alone.round_trips == 0 and alone.llm_tokens == 0 and alone.token_ids


def test_step_exact_sending_every_step_never_loses_text(setup):
    model, ends, channel = setup
    config = CoarseConfig("step-exact", HybridConfig(threshold=-math.inf, settings=SETTINGS, max_new_tokens=48), ends)
    result = run(model, channel, config, 0)
    assert result.sent_positions >= len(result.token_ids) - result.llm_tokens  # every kept draft went up


def test_a_blocks_second_position_follows_the_llm():
    """Block [t0, x1]: t0 is the LLM's mode sent with p~(t0) = 1, x1 drawn from a p~ far from q. Among the
    trials where t0 is accepted, the token decided at the second position is distributed as q given t0."""
    engine = VerifierModel(str(DEMO_PAIR / "llm"), threads=1)
    settings = SamplingSettings(temperature=1.0, top_k=5)
    prompt = [1, 52, 29, 26, 14]
    with torch.inference_mode():
        q0 = probabilities(engine.model(torch.tensor([prompt])).logits[0, -1].float().numpy(), settings)
        t0 = int(np.argmax(q0))
        q1 = probabilities(engine.model(torch.tensor([prompt + [t0]])).logits[0, -1].float().numpy(), settings)
    support = np.flatnonzero(q1)
    first = Compressed(np.array([t0]), np.array([1.0]), 1.0)
    second = Compressed(support, np.full(len(support), 1.0 / len(support)), 1.0)
    def trial(seed: int) -> int | None:
        state = engine.open(prompt, settings, CodecSpec("adaptive"), seed=seed)
        x1 = int(np.random.default_rng([seed, 5]).choice(support))
        outcome = engine.verify(state, [], [(t0, first), (x1, second)])
        engine.close(state)
        return state.context[len(prompt) + 1] if outcome.accepted_count >= 1 else None

    counts = np.zeros(len(q1))
    with ThreadPoolExecutor(8) as pool:  # concurrent sessions: the engine batches their forwards
        for token in pool.map(trial, range(2500)):
            if token is not None:
                counts[token] += 1
    assert counts.sum() > 300
    assert chisquare(counts[support], q1[support] * counts.sum()).pvalue > 1e-3

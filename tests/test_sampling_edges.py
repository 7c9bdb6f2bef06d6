"""Edges of the sampling math that the distribution tests do not reach (found by ``make mutate``).

Numerical stability and batch rows of ``softmax``, ``top_p = 1`` really being "off", deterministic
tie-breaking at the top-p boundary, ``next_token`` being exactly ``sample(probabilities(...))``, the
inverse CDF never landing on a zero-weight token, and error messages that name what to fix.
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud.rejection import verify_draft
from core.sampling import SamplingSettings, next_token, probabilities, sample, softmax


class FixedUniform:
    """A stand-in for ``np.random.Generator`` whose ``random()`` returns the given values in turn."""

    def __init__(self, *values: float):
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.mark.parametrize("bad, word", [(dict(temperature=float("nan")), "temperature"),
                                       (dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                       (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_settings_name_the_setting_and_the_value(bad, word):
    with pytest.raises(ValueError, match=word) as info:
        SamplingSettings(**bad)
    assert str(next(iter(bad.values()))) in str(info.value)


def test_softmax_leaves_its_input_alone():
    logits = np.array([2.0, 1.0, -3.0])
    softmax(logits)
    assert logits.tolist() == [2.0, 1.0, -3.0]


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([1000.0, 999.0, -1000.0]))
    e = np.exp(-1.0)
    np.testing.assert_allclose(p, [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-12)


def test_softmax_normalizes_each_row_of_a_batch():
    """Rows [K, V] (the perturbation estimators use this) are independent: each is shifted by its own
    max, so a row far below another neither underflows to 0/0 nor borrows the other's normalizer."""
    batch = np.array([[0.0, -1.0, -2.0], [1000.0, 999.0, 998.0]])  # [2, 3]
    p = softmax(batch)
    assert p.shape == (2, 3)
    for row, expected in zip(p, (softmax(batch[0]), softmax(batch[1]))):
        np.testing.assert_allclose(row, expected, rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(p[0], p[1], rtol=1e-12)  # the same shape of logits, shifted by 1000


def test_top_p_of_one_is_off():
    """top_p = 1 keeps every token, even where the cumulative sum reaches 1.0 by rounding before the tail
    (a token 50 nats above the rest: the tail's mass is far below one unit in the last place of 1.0)."""
    logits = np.zeros(300)
    logits[0] = 50.0
    p = probabilities(logits, SamplingSettings(top_p=1.0))
    assert np.count_nonzero(p) == 300
    assert np.array_equal(p, softmax(logits))


def test_top_p_ties_at_the_boundary_go_to_the_lowest_ids():
    """Among equal probabilities straddling the nucleus boundary the lower token ids are kept, as in the
    codec (proto.distribution): deterministic whatever the sort's implementation."""
    rng = np.random.default_rng(3)
    weights = rng.integers(0, 5, size=500).astype(np.float64)  # [500] five values: large tie groups
    logits = np.log(np.where(weights > 0, weights, 1e-30))
    full = softmax(logits)
    order = np.lexsort((np.arange(500), -full))  # by probability descending, then id ascending
    n_keep = int(np.searchsorted(np.cumsum(full[order]), 0.5)) + 1
    assert full[order[n_keep - 1]] == full[order[n_keep]]  # the boundary really falls inside a tie group
    kept = np.flatnonzero(probabilities(logits, SamplingSettings(top_p=0.5)))
    assert kept.tolist() == sorted(order[:n_keep].tolist())


def test_next_token_is_sample_of_probabilities():
    logits = np.random.default_rng(4).normal(size=50) * 2
    for settings in (SamplingSettings(), SamplingSettings(temperature=0.7, top_k=10),
                     SamplingSettings(temperature=1.3, top_p=0.8)):
        a, b = np.random.default_rng(9), np.random.default_rng(9)
        drawn = [next_token(logits, settings, a) for _ in range(200)]
        assert drawn == [sample(probabilities(logits, settings), b) for _ in range(200)]
        assert len(set(drawn)) > 1


def test_next_token_greedy_is_the_argmax_and_draws_nothing():
    logits = np.array([0.5, 3.0, 3.0, -1.0])  # a tie: the first index, like np.argmax
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    assert next_token(logits, SamplingSettings(temperature=0), rng) == 1
    assert rng.bit_generator.state == state


def test_sample_never_lands_on_a_zero_weight_token():
    """u = 0 and the largest u < 1 are both possible draws; neither may pick a token of weight 0."""
    assert sample(np.array([0.0, 0.0, 0.7, 0.3]), FixedUniform(0.0)) == 2
    assert sample(np.array([0.7, 0.3, 0.0, 0.0]), FixedUniform(1 - 2.0**-53)) == 1
    assert sample(np.array([0.25, 0.25, 0.5]), FixedUniform(0.5)) == 2  # a boundary belongs to the right


def test_a_draft_outside_p_tilde_is_refused_with_the_fix():
    with pytest.raises(ValueError) as info:
        verify_draft(2, np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.3, 0.5]), np.random.default_rng(0), False)
    message = str(info.value)
    assert "cannot be verified exactly (the edge must draw its draft from the compressed distribution)" in message

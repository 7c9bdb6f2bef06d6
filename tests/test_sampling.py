"""Sampling settings: greedy, temperature, top-k, top-p form the right distribution; draws follow it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from core.sampling import SamplingSettings, probabilities, sample, softmax


def test_greedy_is_one_hot_at_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    p = probabilities(logits, SamplingSettings(temperature=0))
    assert p.tolist() == [0, 1, 0, 0]


def test_temperature_scales_logits():
    logits = np.log(np.array([0.5, 0.25, 0.25]))
    p = probabilities(logits, SamplingSettings(temperature=0.5))
    np.testing.assert_allclose(p, np.array([0.25, 0.0625, 0.0625]) / 0.375)


def test_top_k_keeps_k_largest_over_large_vocab():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=150_000)
    p = probabilities(logits, SamplingSettings(top_k=50))
    kept = np.flatnonzero(p)
    assert len(kept) == 50 and set(kept) == set(np.argsort(logits)[-50:])
    np.testing.assert_allclose(p.sum(), 1.0)


def test_top_p_smallest_prefix_reaching_mass():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    p = probabilities(logits, SamplingSettings(top_p=0.65))
    np.testing.assert_allclose(p, [0.4 / 0.7, 0.3 / 0.7, 0, 0])


def test_top_p_large_vocab_matches_full_sort():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=50_000) * 0.2  # flat: the 1024 candidates do not hold 0.9 of the mass
    p = probabilities(logits, SamplingSettings(top_p=0.9))
    full = softmax(logits)
    order = np.argsort(-full)
    n_keep = int(np.searchsorted(np.cumsum(full[order]), 0.9)) + 1
    assert set(np.flatnonzero(p)) == set(order[:n_keep])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5)])
def test_invalid_settings_rejected(bad):
    with pytest.raises(ValueError):
        SamplingSettings(**bad)


def test_draws_follow_distribution():
    p = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(42)
    counts = np.bincount([sample(p, rng) for _ in range(40_000)], minlength=5)
    assert counts[1] == 0
    nz = p > 0
    assert chisquare(counts[nz], 40_000 * p[nz]).pvalue > 1e-3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=200), st.integers(0, 10), st.floats(0.05, 1.0))
def test_distribution_is_valid(logits, top_k, top_p):
    p = probabilities(np.array(logits), SamplingSettings(temperature=0.7, top_k=top_k, top_p=top_p))
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-9
    assert top_k == 0 or np.count_nonzero(p) <= top_k

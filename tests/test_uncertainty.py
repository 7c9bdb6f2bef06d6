"""Uncertainty estimators: ranges, hand values, U-HLM's cheap exact perturbation, draft (in)dependence."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import binom

from core.sampling import softmax
from edge.uncertainty import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    estimator_cost,
    get_estimator,
    tempered_prob,
)
from tests.test_rejection import chi_square_p

CLOSED_FORM = ["entropy", "max-prob", "margin"]
DRAFT_INDEPENDENT = ["perturb-mode", *CLOSED_FORM]


def test_registry_names_and_default():
    assert set(ESTIMATORS) == {"uhlm", "perturb-mode", "entropy", "max-prob", "margin"}
    assert ESTIMATORS["uhlm"].draft_dependent
    assert not any(ESTIMATORS[n].draft_dependent for n in DRAFT_INDEPENDENT)
    assert not ESTIMATORS[DEFAULT_ESTIMATOR].draft_dependent
    assert all(ESTIMATORS[n].name == n for n in ESTIMATORS)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        get_estimator("vibes")
    assert all(name in str(err.value) for name in ESTIMATORS)


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_closed_form_in_unit_interval(name, dtype):
    rng = np.random.default_rng(0)
    est = get_estimator(name)
    for scale in [0.01, 1.0, 10.0, 100.0]:
        for vocab in [2, 7, 32_000]:
            u = est((scale * rng.normal(size=vocab)).astype(dtype), 0, rng)
            assert isinstance(u, float) and 0.0 <= u <= 1.0


@pytest.mark.parametrize("vocab", [2, 5, 32_000])
def test_hand_values_uniform_logits(vocab):
    logits = np.full(vocab, 3.7, dtype=np.float32)
    rng = np.random.default_rng(0)
    assert get_estimator("entropy")(logits, 0, rng) == pytest.approx(1.0, abs=1e-12)
    assert get_estimator("max-prob")(logits, 0, rng) == pytest.approx(1 - 1 / vocab, abs=1e-12)
    assert get_estimator("margin")(logits, 0, rng) == pytest.approx(1.0, abs=1e-12)


def test_hand_values_near_one_hot():
    logits = np.zeros(1000)
    logits[17] = 60.0
    rng = np.random.default_rng(0)
    for name in CLOSED_FORM:
        assert get_estimator(name)(logits, 17, rng) == pytest.approx(0.0, abs=1e-20)


def test_hand_values_small_distribution():
    p = np.array([0.5, 0.3, 0.2])
    logits = np.log(p) + 4.0  # shift-invariant
    rng = np.random.default_rng(0)
    entropy = -(p * np.log(p)).sum() / np.log(3)
    assert get_estimator("entropy")(logits, 0, rng) == pytest.approx(entropy, rel=1e-12)
    assert get_estimator("max-prob")(logits, 0, rng) == pytest.approx(0.5, rel=1e-12)
    assert get_estimator("margin")(logits, 0, rng) == pytest.approx(0.8, rel=1e-12)


def test_masked_logits_are_fine():
    # -inf logits (masked ids) have probability 0 and must not turn the entropy into nan
    logits = np.array([1.0, -np.inf, 0.0, -np.inf])
    rng = np.random.default_rng(0)
    p = softmax(logits[[0, 2]])
    assert get_estimator("entropy")(logits, 0, rng) == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert 0 <= get_estimator("uhlm")(logits, 2, rng) <= 1


# --- the temperature perturbation --------------------------------------------------------------------------

def test_reduced_set_matches_full_vocabulary():
    rng = np.random.default_rng(1)
    thetas = 2.0 * (1.0 - rng.random(50))  # [50] in (0, 2]
    thetas[:3] = [2.0, 1e-3, 0.05]  # the edges: widest kept set, and nearly-greedy temperatures
    for scale in [1.0, 8.0, 40.0]:  # at scale 40 the reduced set really drops most of the vocabulary
        logits = (scale * rng.normal(size=32_000)).astype(np.float32)
        z = logits.astype(np.float64)
        order = np.argsort(-z)
        for token in [order[0], order[1], order[50], order[5000], order[-1]]:
            full = np.array([softmax(z / t)[token] for t in thetas])  # [50] brute force over all V
            np.testing.assert_allclose(tempered_prob(logits, token, thetas), full, rtol=1e-12, atol=1e-12)


def _brute_force_u(logits: np.ndarray, draft: int, rng: np.random.Generator, k: int) -> float:
    """U-HLM as written in the paper: draw K full tokens from softmax(logits / theta_k) and compare."""
    thetas = 2.0 * (1.0 - rng.random(k))  # [K]
    probs = softmax(logits[None, :] / thetas[:, None])  # [K, V]
    cum = np.cumsum(probs, axis=1)  # [K, V]
    tokens = (cum < rng.random(k)[:, None] * cum[:, -1:]).sum(axis=1)  # [K] inverse CDF per row
    return float(np.mean(tokens != draft))


def _expected_u(logits: np.ndarray, token: int) -> float:
    """E[1 - P_theta(token)] for theta ~ U(0, 2], by numerical integration."""
    z = np.asarray(logits, dtype=np.float64)
    value, _ = integrate.quad(lambda t: 1.0 - softmax(z / t)[token], 0.0, 2.0, limit=200)
    return value / 2.0


@pytest.mark.exactness
@pytest.mark.parametrize("draft", [0, 1, 3])
def test_uhlm_matches_brute_force_in_distribution(draft):
    # Each of the K comparisons differs from the draft independently with probability
    # E_theta[1 - P_theta(draft)], so K * u ~ Binomial(K, that expectation) for both implementations.
    k, n = 20, 20_000
    logits = np.array([2.0, 1.5, 0.3, -1.0, 0.9])
    fast_rng, brute_rng = np.random.default_rng(40 + draft), np.random.default_rng(50 + draft)
    fast = np.array([get_estimator("uhlm", k)(logits, draft, fast_rng) for _ in range(n)])  # [n]
    brute = np.array([_brute_force_u(logits, draft, brute_rng, k) for _ in range(n)])  # [n]
    expected = _expected_u(logits, draft)
    law = binom.pmf(np.arange(k + 1), k, expected)  # [K + 1]
    for sample in (fast, brute):
        assert abs(sample.mean() - expected) < 4 * sample.std() / np.sqrt(n)
        # the whole law of u (K + 1 values), not just its mean
        assert chi_square_p(np.bincount(np.rint(sample * k).astype(int), minlength=k + 1), law) > 1e-3


def test_perturb_mode_expectation():
    logits = np.array([0.2, 2.0, 1.5, -1.0])
    rng = np.random.default_rng(5)
    n = 20_000
    u = np.array([get_estimator("perturb-mode")(logits, 0, rng) for _ in range(n)])
    assert abs(u.mean() - _expected_u(logits, 1)) < 4 * u.std() / np.sqrt(n)


@pytest.mark.parametrize("k", [1, 7, 20])
def test_perturbation_takes_k_plus_one_values(k):
    rng = np.random.default_rng(k)
    values = set()
    for name in ["uhlm", "perturb-mode"]:
        est = get_estimator(name, k)
        for _ in range(300):
            logits = rng.normal(size=16) * rng.uniform(0.1, 3)
            u = est(logits, int(rng.integers(16)), rng)
            assert 0 <= u <= 1 and u * k == pytest.approx(round(u * k), abs=1e-12)
            values.add(round(u * k))
    assert values <= set(range(k + 1)) and len(values) > min(k, 3)


@pytest.mark.parametrize("name", DRAFT_INDEPENDENT)
def test_draft_independent_estimators_ignore_the_draft(name):
    est = get_estimator(name)
    logits = np.random.default_rng(2).normal(size=32_000).astype(np.float32)
    results = set()
    for draft in [0, 5, 31_999, 10**9]:  # an id outside V: it must not even be read
        results.add(est(logits, draft, np.random.default_rng(7)))
    assert len(results) == 1


def test_uhlm_depends_on_the_draft():
    est = get_estimator("uhlm")
    logits = np.array([3.0, 0.0, 0.0])
    u_mode = est(logits, 0, np.random.default_rng(7))
    u_tail = est(logits, 1, np.random.default_rng(7))
    assert u_mode < u_tail


def test_estimator_cost_is_the_median_call_time(monkeypatch):
    """The cost is the median of the measured per-call seconds. Tests never assert wall-clock bounds, so a
    fake clock makes the measured durations known: the estimator still runs, the arithmetic is checked."""
    import edge.uncertainty

    durations = [0.003, 0.001, 0.002, 0.005, 0.004]  # median 0.003
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    for name in ESTIMATORS:
        readings = iter([t for i, d in enumerate(durations) for t in (10.0 * i, 10.0 * i + d)])
        clock = SimpleNamespace(perf_counter=lambda: next(readings))  # edge.uncertainty's view of `time` only
        monkeypatch.setattr(edge.uncertainty, "time", clock)
        cost = estimator_cost(name, logits, n=len(durations))
        monkeypatch.undo()
        assert cost == pytest.approx(0.003, abs=1e-12), name
        assert next(readings, None) is None  # exactly two clock readings per call


def test_invalid_k():
    with pytest.raises(ValueError):
        get_estimator("uhlm", k=0)

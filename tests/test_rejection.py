"""The accept/resample math: verified tokens follow q exactly, for every draft distribution p~ and codec."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from cloud.rejection import acceptance_beta, verify_draft
from proto.distribution import CodecSpec, compress

N_ROUNDS = 100_000
ALPHA = 1e-3  # p-value floor for "matches"; fixed seeds make every run identical


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value that ``counts`` [V] are draws from ``probs`` [V].

    Cells with probability 0 must have count exactly 0 (asserted) and are dropped; cells expecting fewer
    than 5 draws are pooled into one, so the chi-square approximation holds.
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64) / np.sum(probs)
    zero = probs == 0
    assert counts[zero].sum() == 0, f"draws landed on zero-probability ids {np.flatnonzero(zero & (counts > 0))}"
    expected = counts.sum() * probs  # [V]
    small = ~zero & (expected < 5)
    big = ~zero & ~small
    obs = list(counts[big])
    exp = list(expected[big])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


def run_rounds(p_tilde: np.ndarray, q: np.ndarray, drafts: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """Verify every draft [N] against q; returns (output token counts [V], number accepted)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(drafts), dtype=np.int64)
    n_accepted = 0
    for i, x in enumerate(drafts.tolist()):
        accepted, out[i] = verify_draft(x, p_tilde, q, rng, greedy=False)
        n_accepted += accepted
    return np.bincount(out, minlength=len(q)), n_accepted


def _normalize(w) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1234)
    sparse_p = np.zeros(50)
    sparse_p[[3, 17, 41]] = [0.6, 0.3, 0.1]
    one_hot = np.zeros(10)
    one_hot[4] = 1.0
    same = _normalize(rng.dirichlet(np.ones(20)))
    return {
        # q much smaller than p~ on the likely drafts: mostly rejections
        "q_much_smaller": (_normalize([0.5, 0.3, 0.1, 0.05, 0.03, 0.02]),
                           _normalize([0.01, 0.04, 0.15, 0.3, 0.3, 0.2])),
        # q is zero where p~ is positive: those drafts are always rejected and must never come out
        "q_zeros": (_normalize(np.ones(8)), _normalize([0, 0.5, 0, 0.2, 0, 0.3, 0, 0])),
        # sparse p~ (most ids zero) against a dense q
        "sparse_p": (sparse_p, _normalize(rng.dirichlet(np.ones(50)))),
        "p_equals_q": (same, same.copy()),
        "p_one_hot": (one_hot, _normalize(rng.dirichlet(np.ones(10)))),
        # disjoint supports: every draft rejected, the residual is q itself
        "disjoint": (_normalize([0.5, 0.5, 0, 0]), _normalize([0, 0, 0.3, 0.7])),
        "dense_random": (_normalize(rng.dirichlet(0.3 * np.ones(30))), _normalize(rng.dirichlet(np.ones(30)))),
    }


CASES = _cases()


@pytest.mark.exactness
@pytest.mark.parametrize("name", list(CASES))
def test_verified_tokens_follow_q(name):
    p_tilde, q = CASES[name]
    drafts = np.random.default_rng(7).choice(len(p_tilde), size=N_ROUNDS, p=p_tilde)  # x ~ p~, unbiased
    counts, n_accepted = run_rounds(p_tilde, q, drafts, seed=8)
    assert chi_square_p(counts, q) > ALPHA
    # acceptance rate is sum_x min(p~(x), q(x)) (binomial check, 5 standard errors)
    rate = np.minimum(p_tilde, q).sum()
    se = np.sqrt(rate * (1 - rate) / N_ROUNDS)
    assert abs(n_accepted / N_ROUNDS - rate) <= 5 * se + 1e-12


def test_p_equals_q_never_rejects():
    p_tilde, q = CASES["p_equals_q"]
    drafts = np.random.default_rng(3).choice(len(q), size=5000, p=p_tilde)
    _, n_accepted = run_rounds(p_tilde, q, drafts, seed=4)
    assert n_accepted == 5000


class _ForcedRejection:
    """An rng stub whose ``random()`` returns 1.0 (a real Generator draws [0, 1), so this forces a rejection
    even where p~ == q) and whose ``standard_exponential`` returns ``race`` or a real generator's draws."""

    def __init__(self, race=None, real=None):
        self.race, self.real = race, real

    def random(self):
        return 1.0

    def standard_exponential(self, n):
        return np.asarray(self.race, dtype=np.float64) if self.race is not None else self.real.standard_exponential(n)


def test_zero_residual_falls_back_to_q():
    q = _normalize([0.1, 0.2, 0.3, 0.4])
    # p~ == q and a forced rejection: the residual max(0, q - p~) is all zero, so the recovered token must
    # come from q: the id whose race time over q is smallest.
    for race, expected in [([0.01, 1, 1, 1], 0), ([1, 0.01, 1, 1], 1), ([1, 1, 0.01, 1], 2), ([1, 1, 1, 1], 3)]:
        accepted, token = verify_draft(2, q, q.copy(), _ForcedRejection(race), greedy=False)
        assert (accepted, token) == (False, expected)


@pytest.mark.exactness
def test_zero_residual_fallback_is_distributed_as_q():
    q = _normalize([0.05, 0.0, 0.25, 0.3, 0.4])
    real = np.random.default_rng(11)
    n = 20_000
    counts = np.zeros(len(q), dtype=np.int64)
    for _ in range(n):
        _, token = verify_draft(3, q, q.copy(), _ForcedRejection(real=real), greedy=False)
        counts[token] += 1
    assert chi_square_p(counts, q) > ALPHA


def test_the_recovered_token_survives_last_bit_noise_in_q():
    """The verifier recomputes q in other forward shapes (a replay's prefill, a batch), which changes its
    last float bits: the recovered token must not move with them. Residuals over a 32k id space, q with
    relative noise 1e-4 (the demo LLM's replay differs by ~3e-6), 400 draws: an inverse-CDF draw moved on
    4 of them (29 at 1e-3), the race on none (1 at 1e-3)."""
    rng = np.random.default_rng(5)
    moved = 0
    for seed in range(400):
        q = rng.dirichlet(np.full(32_000, 0.3))
        noisy = _normalize(q * (1 + 1e-4 * rng.standard_normal(q.size)))
        p_tilde = np.zeros_like(q)
        p_tilde[0] = 1.0  # draft 0, certain on the edge: the residual is q off id 0
        draws = [verify_draft(0, p_tilde, target, np.random.default_rng([seed, 1]), greedy=False)
                 for target in (q, noisy)]
        moved += draws[0] != draws[1]
    assert moved == 0


def test_greedy_accepts_iff_argmax():
    q = _normalize([0.1, 0.4, 0.2, 0.3])
    p_tilde = _normalize([0.7, 0.1, 0.1, 0.1])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert verify_draft(1, p_tilde, q, rng, greedy=True) == (True, 1)
    assert verify_draft(0, p_tilde, q, rng, greedy=True) == (False, 1)
    assert verify_draft(3, p_tilde, q, rng, greedy=True) == (False, 1)
    assert rng.bit_generator.state == state  # greedy verdicts consume no randomness


def test_greedy_ties_go_to_first_index():
    q = _normalize([0.1, 0.35, 0.2, 0.35])
    p_tilde = _normalize(np.ones(4))
    assert verify_draft(3, p_tilde, q, np.random.default_rng(0), greedy=True) == (False, 1)
    assert verify_draft(1, p_tilde, q, np.random.default_rng(0), greedy=True) == (True, 1)


def test_draft_outside_support_raises():
    p_tilde = _normalize([0.5, 0.5, 0.0, 0.0])
    q = _normalize(np.ones(4))
    with pytest.raises(ValueError, match="outside the sent support"):
        verify_draft(2, p_tilde, q, np.random.default_rng(0), greedy=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_draft(4, p_tilde, q, np.random.default_rng(0), greedy=False)
    with pytest.raises(ValueError, match="same size"):
        verify_draft(0, p_tilde, q[:3], np.random.default_rng(0), greedy=False)
    with pytest.raises(ValueError, match="outside the sent support"):
        acceptance_beta(3, p_tilde, q)


def test_acceptance_beta_hand_cases():
    p_tilde = np.array([0.5, 0.25, 0.25, 0.0])
    q = np.array([0.25, 0.5, 0.0, 0.25])
    assert acceptance_beta(0, p_tilde, q) == pytest.approx(0.5)  # 1 - 0.25/0.5
    assert acceptance_beta(1, p_tilde, q) == 0.0  # q >= p~: always accepted
    assert acceptance_beta(2, p_tilde, q) == 1.0  # q == 0: always rejected
    assert acceptance_beta(np.int64(0), p_tilde.astype(np.float32), q) == pytest.approx(0.5)


# --- every payload codec keeps verification exact ------------------------------------------------------------

CODEC_SPECS = ["full32", "full16", "topk", "adaptive"]


@pytest.mark.exactness
@pytest.mark.parametrize("codec", CODEC_SPECS)
def test_every_codec_is_exact(codec):
    vocab = 48
    rng = np.random.default_rng(99)
    # a peaked SLM distribution with a long tail, so top-k and adaptive truncation really cut mass
    p = np.exp(2.5 * rng.normal(size=vocab))
    p /= p.sum()
    q = np.exp(2.5 * rng.normal(size=vocab) + 0.5 * np.log(p))
    q /= q.sum()
    spec = CodecSpec(name=codec, k=8, eps=0.05, k_max=16) if codec in ("topk", "adaptive") else CodecSpec(codec)
    compressed = compress(p, spec)
    p_tilde = compressed.dense(vocab)  # [V] float64, the distribution the cloud reconstructs
    draft_rng = np.random.default_rng(5)
    drafts = np.array([compressed.sample(draft_rng) for _ in range(N_ROUNDS)])
    assert chi_square_p(np.bincount(drafts, minlength=vocab), p_tilde) > ALPHA  # the codec's own draw
    counts, _ = run_rounds(p_tilde, q, drafts, seed=6)
    assert chi_square_p(counts, q) > ALPHA

"""The mixture identity: with a draft-independent send rule a position is exactly (1 - s) p~ + s q.

Here a "position" is the whole edge+cloud step: draw x ~ p~, decide to send, and if sent replace x by
the verifier's verdict. ``s`` is the probability of sending at that position.
"""

from __future__ import annotations

import numpy as np
import pytest

from cloud.rejection import verify_draft
from core.sampling import softmax
from edge.uncertainty import get_estimator
from tests.test_rejection import ALPHA, chi_square_p

N_TRIALS = 100_000


def run_position(p_tilde, q, send_rule, n: int, seed: int) -> tuple[np.ndarray, float]:
    """Simulate one position n times; returns (output token counts [V], measured send rate).

    ``send_rule(x, rng) -> bool`` decides whether draft ``x`` is verified. Drafts, send decisions and
    verification each get their own stream so that no rule sees another's randomness.
    """
    draft_rng, send_rng, verify_rng = (np.random.default_rng(seed + i) for i in range(3))
    drafts = draft_rng.choice(len(p_tilde), size=n, p=p_tilde)  # [n] unbiased draws x ~ p~
    out = np.empty(n, dtype=np.int64)
    n_sent = 0
    for i, x in enumerate(drafts.tolist()):
        if send_rule(x, send_rng):
            n_sent += 1
            _, out[i] = verify_draft(x, p_tilde, q, verify_rng, greedy=False)
        else:
            out[i] = x
    return np.bincount(out, minlength=len(q)), n_sent / n


def mixture(p_tilde, q, s: float) -> np.ndarray:
    return (1 - s) * p_tilde + s * q  # [V]


@pytest.mark.exactness
@pytest.mark.parametrize("s", [0.3, 0.8])
def test_independent_coin_gives_mixture(s):
    rng = np.random.default_rng(21)
    p_tilde = rng.dirichlet(0.5 * np.ones(12))
    q = rng.dirichlet(np.ones(12))
    q[[2, 7]] = 0.0  # ids the LLM never produces: only skipped drafts may emit them
    q /= q.sum()
    counts, sent = run_position(p_tilde, q, lambda x, r: r.random() < s, N_TRIALS, seed=100)
    assert abs(sent - s) < 5 * np.sqrt(s * (1 - s) / N_TRIALS)
    assert chi_square_p(counts, mixture(p_tilde, q, s)) > ALPHA


# A tiny vocabulary where the SLM's mode has probability 0.6 and a second token 0.4, and the LLM prefers
# the mode more strongly: drafts of the second token are the ones verification most often rejects.
SLM_LOGITS = np.log(np.array([0.6, 0.4]))
LLM_Q = np.array([0.9, 0.1])
U_TH = 0.3  # send iff u > U_TH (u <= u_th keeps the draft)


def _threshold_rule(estimator_name: str):
    estimator = get_estimator(estimator_name)
    return lambda x, rng: estimator(SLM_LOGITS, x, rng) > U_TH


@pytest.mark.exactness
@pytest.mark.slow  # ~17 s: runs in make test, not in make test-fast
def test_uhlm_draft_dependent_rule_breaks_mixture():
    """U-HLM's u is the share of perturbed samples that differ from the draft, so a draft of the
    unlikely token looks uncertain and is sent far more often than a draft of the mode: the sent drafts
    are no longer an unbiased draw from p~, and rejection sampling's guarantee (which assumes x ~ p~) is
    lost. Measuring the perturbation against the mode instead makes the send decision independent of the
    draft, and the position is again exactly (1 - s) p~ + s q."""
    p_tilde = softmax(SLM_LOGITS)
    counts, s_bar = run_position(p_tilde, LLM_Q, _threshold_rule("uhlm"), N_TRIALS, seed=200)
    assert 0.05 < s_bar < 0.95  # a real mix of sent and kept positions
    assert chi_square_p(counts, mixture(p_tilde, LLM_Q, s_bar)) < 1e-6

    counts, s_bar = run_position(p_tilde, LLM_Q, _threshold_rule("perturb-mode"), N_TRIALS, seed=300)
    assert 0.05 < s_bar < 0.95
    assert chi_square_p(counts, mixture(p_tilde, LLM_Q, s_bar)) > ALPHA


@pytest.mark.exactness
@pytest.mark.parametrize("name", ["entropy", "max-prob", "margin"])
def test_closed_form_estimators_keep_mixture(name):
    # Deterministic in the logits: s is 0 or 1 at a fixed position, so mix two positions' worth of logits
    # by picking the logits at random (independently of the draft) and thresholding at the median.
    estimator = get_estimator(name)
    rng = np.random.default_rng(31)
    p_tilde = rng.dirichlet(np.ones(8))
    q = rng.dirichlet(np.ones(8))
    sure, unsure = np.array([8.0, 0, 0, 0]), np.zeros(4)
    u_th = 0.5 * (estimator(sure, 0, rng) + estimator(unsure, 0, rng))

    def rule(x, r):
        logits = sure if r.random() < 0.6 else unsure
        return estimator(logits, x, r) > u_th

    counts, s_bar = run_position(p_tilde, q, rule, N_TRIALS // 2, seed=400)
    assert abs(s_bar - 0.4) < 0.01
    assert chi_square_p(counts, mixture(p_tilde, q, s_bar)) > ALPHA

"""Per-token uncertainty estimators ``u`` that decide whether the edge sends a position for verification.

Every estimator takes the RAW logits [V] of the SLM at temperature 1 (float32 or float64), the draft token
id and a numpy Generator, and returns a float ``u`` in [0, 1]; larger means less sure. They use the raw
logits, not the session's sampling distribution, because under greedy decoding that distribution is
one-hot and would carry no uncertainty at all.

Estimators (registry ``ESTIMATORS``):

- ``uhlm``: U-HLM's temperature perturbation (Oh et al., arXiv 2412.12687): K samples from
  softmax(logits / theta_k), theta_k ~ U(0, 2]; u = share of samples that differ from the *draft*.
  Kept as the paper's baseline. It is **draft-dependent**: the send decision then depends on the drawn
  draft, the sent drafts are a biased sample of p~, and verified positions are no longer exactly q
  (docs/design.md, "Exactness"; tests/test_mixture.py shows it).
- ``perturb-mode``: the same perturbation compared with the mode (argmax of the logits): draft-independent.
- ``entropy``: Shannon entropy of softmax(logits) divided by log(V).
- ``max-prob``: 1 - max softmax(logits).
- ``margin``: 1 - (top1 - top2) of softmax(logits).

Draft-independent estimators never read the draft argument, so with any of them each position is exactly
``(1 - s) * p~ + s * q`` where ``s`` is its send probability.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Terms exp(-gap/theta) with gap/theta > _GAP_CUTOFF are dropped from the softmax denominator. The mode's
# own term is exp(0) = 1, so the denominator is >= 1, and the dropped terms together are < V * exp(-cutoff).
# With cutoff = 40 + log(V) that total is < exp(-40) ~ 4e-18, below half an ulp of 1.0 (1.1e-16): the
# reduced sum equals the full-vocabulary sum to float64 resolution, however large V is.
_GAP_CUTOFF_BASE = 40.0
_THETA_MAX = 2.0  # perturbation temperatures are drawn from U(0, 2]
DEFAULT_K = 20  # U-HLM's number of perturbed samples


@dataclass(frozen=True)
class Estimator:
    """A named uncertainty estimator; ``draft_dependent`` says whether ``fn`` reads the draft at all."""

    name: str
    draft_dependent: bool
    fn: Callable[[np.ndarray, int, np.random.Generator], float]  # (logits [V], draft id, rng) -> u

    def __call__(self, logits: np.ndarray, draft: int, rng: np.random.Generator) -> float:
        return self.fn(logits, draft, rng)


# --- temperature perturbation (U-HLM and its mode variant) -----------------------------------------------

def _draw_thetas(k: int, rng: np.random.Generator) -> np.ndarray:
    """K perturbation temperatures [K] in (0, 2]: 2 * (1 - U[0, 1)) never yields 0."""
    return _THETA_MAX * (1.0 - rng.random(k))


def tempered_prob(logits: np.ndarray, token: int, thetas: np.ndarray) -> np.ndarray:
    """P_theta(token) = softmax(logits / theta)[token] for every theta in ``thetas`` [K]; returns [K].

    Computed as exp(-gap_token / theta) / sum_i exp(-gap_i / theta) with gap = max(logits) - logits >= 0,
    on the reduced set of ids whose gap can still matter for the largest theta (see _GAP_CUTOFF_BASE):
    one pass over V for the gaps and the mask, then one [K, n_kept] exp instead of [K, V].
    """
    z = np.asarray(logits, dtype=np.float64)  # [V]
    gaps = z.max() - z  # [V] >= 0, 0 at the mode; -inf logits give +inf gaps (dropped below)
    cutoff = (_GAP_CUTOFF_BASE + math.log(z.shape[0])) * float(thetas.max())
    kept = gaps[np.flatnonzero(gaps < cutoff)]  # [n_kept], always holds the mode
    inv_theta = 1.0 / thetas  # [K]
    terms = np.multiply.outer(-inv_theta, kept)  # [K, n_kept]
    np.exp(terms, out=terms)
    denom = terms.sum(axis=1)  # [K] >= 1 (the mode's term)
    return np.exp(-gaps[token] * inv_theta) / denom  # [K]


def _perturbation_u(logits: np.ndarray, token: int, rng: np.random.Generator, k: int) -> float:
    """Share of K perturbed samples that differ from ``token``, drawn exactly without sampling tokens.

    A sample token_k ~ softmax(logits / theta_k) differs from ``token`` with probability
    1 - P_theta_k(token), so one Bernoulli per sample (one uniform each) has the same distribution as
    drawing the full token and comparing; u takes the K + 1 values 0, 1/K, ..., 1.
    """
    thetas = _draw_thetas(k, rng)  # [K]
    differ = rng.random(k) < 1.0 - tempered_prob(logits, token, thetas)  # [K] bool
    return float(np.count_nonzero(differ)) / k


def _uhlm(logits: np.ndarray, draft: int, rng: np.random.Generator, k: int = DEFAULT_K) -> float:
    return _perturbation_u(logits, int(draft), rng, k)


def _perturb_mode(logits: np.ndarray, draft: int, rng: np.random.Generator, k: int = DEFAULT_K) -> float:
    del draft  # draft-independent by construction: compare with the mode, never with the draft
    return _perturbation_u(logits, int(np.argmax(logits)), rng, k)


# --- closed-form estimators on softmax(logits) ------------------------------------------------------------
#
# Each is a few passes over V (150k at Qwen's vocabulary), so every pass counts: no BLAS (np.dot of two
# [V] vectors runs on OpenBLAS's threads, ~7 ms on a busy 2-core machine against ~0.03 ms on one, and
# the thread count is a process-wide setting this module must not depend on), no sort or partition of V,
# and one [V] float64 temporary at a time: when two 1.2 MB blocks are freed together glibc hands the
# memory back to the kernel, and faulting it in again on the next token costs ~1 ms in a small VM.

# exp(z) rounds to exactly 0.0 in float64 for every z below -745.2: clamping a logit at max - 746 changes
# no exp and keeps 0 * logit at 0 where the logit is -inf (a masked id) instead of nan.
_EXP_UNDERFLOW = -746.0


def _shifted(logits: np.ndarray) -> np.ndarray:
    """z = logits - max(logits) as a fresh float64 [V] (<= 0, 0 at the mode)."""
    x = np.asarray(logits)
    z = x.astype(np.float64)  # [V] a copy, shifted in place
    z -= np.float64(x.max())  # the max of the raw logits is exactly the max of their float64 cast
    return z


def _entropy(logits: np.ndarray, draft: int, rng: np.random.Generator) -> float:
    del draft, rng
    x = np.asarray(logits)
    if x.shape[0] < 2:
        return 0.0
    top = np.float64(x.max())
    if x.min() == -np.inf:  # masked logits: 0 * -inf would be nan; the clamp leaves every exp as it was
        x = np.maximum(x, top + _EXP_UNDERFLOW)  # [V] float64
    e = _shifted(x)
    np.exp(e, out=e)  # [V] e = exp(x - top), in place: the only [V] temporary
    total = float(e.sum())  # Z >= 1: the mode gives exp(0)
    # H = -sum p log p = log Z - sum(p z) with p = e / Z, z = x - top: sum(p z) = sum(e x) / Z - top.
    # Summing e * x instead of e * z needs no second [V] array, at an absolute error of a few ulps of
    # |top| (~1e-14 for logits of magnitude 50); einsum without optimize is numpy's own loop, not BLAS.
    h = math.log(total) - (float(np.einsum("i,i->", e, x)) / total - float(top))
    return min(1.0, max(0.0, h / math.log(x.shape[0])))


def _max_prob(logits: np.ndarray, draft: int, rng: np.random.Generator) -> float:
    del draft, rng
    e = _shifted(logits)
    np.exp(e, out=e)  # [V]
    return 1.0 - 1.0 / float(e.sum())  # the mode's probability is exp(0) / Z


def _margin(logits: np.ndarray, draft: int, rng: np.random.Generator) -> float:
    del draft, rng
    x = np.asarray(logits)
    if x.shape[0] < 2:
        return 0.0
    # The runner-up is the largest entry once the (first) argmax is left out: two max passes over the raw
    # logits instead of a partition of V; shifted exactly like _shifted shifts it.
    top = int(np.argmax(x))
    second = max(x[:top].max(initial=-np.inf), x[top + 1:].max(initial=-np.inf))
    second = float(np.float64(second) - np.float64(x[top]))  # <= 0; the largest shifted logit is 0
    e = _shifted(x)
    np.exp(e, out=e)  # [V]
    total = float(e.sum())
    return min(1.0, max(0.0, 1.0 - (1.0 - math.exp(second)) / total))


# --- registry -----------------------------------------------------------------------------------------------

def _make(name: str, k: int = DEFAULT_K) -> Estimator:
    if name == "uhlm":
        return Estimator("uhlm", True, functools.partial(_uhlm, k=k))
    if name == "perturb-mode":
        return Estimator("perturb-mode", False, functools.partial(_perturb_mode, k=k))
    return Estimator(name, False, {"entropy": _entropy, "max-prob": _max_prob, "margin": _margin}[name])


ESTIMATORS: dict[str, Estimator] = {
    name: _make(name) for name in ("uhlm", "perturb-mode", "entropy", "max-prob", "margin")
}

# A draft-independent default keeps verified positions exact; 1 - max p is also the cheapest (one exp pass
# over V). Its threshold comes from the demo pair's measured frontier (README, "Measured frontier").
DEFAULT_ESTIMATOR = "max-prob"


def get_estimator(name: str, k: int = DEFAULT_K) -> Estimator:
    """The estimator called ``name``; ``k`` is the number of perturbed samples (perturbation ones only)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown uncertainty estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    if k < 1:
        raise ValueError(f"k (perturbed samples) must be >= 1, got {k}")
    return ESTIMATORS[name] if k == DEFAULT_K else _make(name, k)


def estimator_cost(name: str, logits: np.ndarray, n: int = 200) -> float:
    """Median wall seconds of one call of estimator ``name`` on ``logits`` [V] (draft = the mode)."""
    estimator = get_estimator(name)
    rng = np.random.default_rng(0)
    draft = int(np.argmax(logits))
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        estimator(logits, draft, rng)
        times[i] = time.perf_counter() - start
    return float(np.median(times))

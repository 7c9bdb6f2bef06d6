"""The cloud's accept/resample rule for one drafted token (speculative sampling), in numpy.

One pure function decides a verified position; the verifier, the evaluation and the tests all call it.
It must stay free of torch: the cloud hands it the target distribution as a numpy array.

Glossary
--------
draft token ``x``
    The token the edge drew at this position, ``x ~ p~`` (from the *compressed* distribution it sent,
    never from its uncompressed one).
draft distribution ``p~`` (``p_tilde``)
    The edge's compressed distribution, reconstructed bit for bit on the cloud: dense [V], sums to 1,
    zero outside the sent support.
target distribution ``q``
    The large model's distribution at the same position after the session's sampling settings
    (temperature, top-k, top-p): dense [V], sums to 1.
accepted token
    The draft, kept with probability ``min(1, q[x] / p~[x])``.
recovered token
    The replacement after a rejection, drawn from the residual ``norm(max(0, q - p~))``: exactly the
    mass that ``q`` puts where the draft distribution under-proposes. Accepted-or-recovered is then
    distributed exactly as ``q`` (Leviathan et al. 2023, Chen et al. 2023), provided ``x`` is an unbiased
    draw from ``p~`` -- see docs/design.md, "Exactness", on draft-dependent send decisions.

Greedy sessions (temperature 0) use the deterministic rule: accept iff ``x == argmax q``, else the
recovered token is ``argmax q`` (first index on ties, as ``np.argmax``). It consumes no random numbers.
"""

from __future__ import annotations

import numpy as np



def _check_draft(draft: int, p_tilde: np.ndarray, q: np.ndarray) -> None:
    if p_tilde.shape != q.shape or p_tilde.ndim != 1:
        raise ValueError(f"p_tilde and q must be 1-D of the same size, got {p_tilde.shape} and {q.shape}")
    if not 0 <= draft < q.shape[0]:
        raise ValueError(f"draft token {draft} is outside the vocabulary [0, {q.shape[0]})")


def _nonzero_support_prob(p_tilde: np.ndarray, draft: int) -> float:
    p_x = float(p_tilde[draft])
    if not p_x > 0:
        # The acceptance ratio q[x]/p~[x] is undefined: the draft was not drawn from the sent p~.
        raise ValueError(f"draft token {draft} has p~ = {p_x}: outside the sent support, cannot be "
                         "verified exactly (the edge must draw its draft from the compressed distribution)")
    return p_x


def _sample_residual(p_tilde: np.ndarray, q: np.ndarray, rng: np.random.Generator) -> int:
    """Recovered token: one draw from norm(max(0, q - p~)), or from q if that residual is all zero.

    The draw is an exponential race, not an inverse CDF: every id i of the id space gets its own
    ``E_i ~ Exp(1)`` from ``rng`` and the token is ``argmin E_i / w_i`` over the weights ``w``; the winner is
    i with probability ``w_i / sum(w)`` exactly. Why: the verifier recomputes q after a failover or a
    replay (one prefill instead of many cached steps) and in other batch shapes, and those forwards differ
    in the last float bits. An inverse CDF over a 32k-150k cumulative sum turns such noise into a
    neighbouring id whenever ``u`` lands near one of V boundaries (a replayed demo-LLM session resampled
    7743 where the original had 7744); the race changes its winner only when the two smallest keys are
    within that noise of each other (tests/test_rejection.py measures both).
    """
    residual = np.maximum(q - p_tilde, 0.0)  # [V]
    if not residual.any():
        # Only reachable by rounding (a rejection implies q[x] < p~[x], so q > p~ somewhere when both sum
        # to 1): q itself is then the best available answer.
        residual = q
    race = rng.standard_exponential(q.shape[0])  # [V]: one per id, whichever ids have mass
    with np.errstate(divide="ignore"):
        keys = race / residual  # [V]: +inf where the weight is 0, so a zero-weight id never wins
    return int(np.argmin(keys))


def verify_draft(draft: int, p_tilde: np.ndarray, q: np.ndarray, rng: np.random.Generator,
                 greedy: bool) -> tuple[bool, int]:
    """Accept or replace one draft token; returns ``(accepted, token)``.

    ``p_tilde`` [V] and ``q`` [V] are dense distributions (see the module glossary). A sampled session
    accepts with probability ``min(1, q[x]/p~[x])`` using one uniform ``u`` (accept iff
    ``u * p~[x] < q[x]``, which needs no division), else returns a recovered token from the residual (one
    more uniform). Greedy: accept iff ``x == argmax q``, else ``argmax q``; no randomness, and ``p~`` is
    not consulted (the greedy verdict is exact whatever the edge proposed).

    Raises ``ValueError`` for a draft outside the vocabulary, or (sampled sessions) outside the support
    of ``p~``.
    """
    p_tilde = np.asarray(p_tilde, dtype=np.float64)  # [V]
    q = np.asarray(q, dtype=np.float64)  # [V]
    draft = int(draft)
    _check_draft(draft, p_tilde, q)
    if greedy:
        target = int(np.argmax(q))  # first index on ties
        return draft == target, target
    p_x = _nonzero_support_prob(p_tilde, draft)
    if rng.random() * p_x < q[draft]:
        return True, draft
    return False, _sample_residual(p_tilde, q, rng)


def acceptance_beta(draft: int, p_tilde: np.ndarray, q: np.ndarray) -> float:
    """U-HLM's per-token rejection probability ``beta = max(0, 1 - q[x]/p~[x])`` of draft ``x``.

    Used by threshold calibration (fit ``beta = a*u + b``); a deterministic quantity, no sampling.
    """
    p_tilde = np.asarray(p_tilde, dtype=np.float64)  # [V]
    q = np.asarray(q, dtype=np.float64)  # [V]
    draft = int(draft)
    _check_draft(draft, p_tilde, q)
    p_x = _nonzero_support_prob(p_tilde, draft)
    return max(0.0, 1.0 - float(q[draft]) / p_x)

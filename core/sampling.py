"""Sampling settings and logits → distribution → token, in numpy (vectorized, no torch).

One implementation of the rule that turns logits into the distribution a token is drawn from:
temperature, then top-k, then top-p (nucleus), renormalized; temperature 0 means greedy (one-hot at the
argmax). Top-k uses ``argpartition`` (linear time), not a full sort, so a 150k vocabulary stays cheap;
top-p sorts only a candidate set unless the candidates do not hold enough mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TOP_P_CANDIDATES = 1024  # sort only this many of the largest probabilities for top-p, when enough


@dataclass(frozen=True)
class SamplingSettings:
    """How a distribution is formed from logits. ``temperature == 0`` is greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax along the last axis, in float64."""
    z = logits.astype(np.float64, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits (unordered)."""
    return np.argpartition(logits, -k)[-k:]


def _nucleus(probs: np.ndarray, idx: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest prefix (by descending probability) of ``idx`` whose mass reaches ``top_p``."""
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order])
    return order[: min(len(order), int(np.searchsorted(cum, top_p)) + 1)]


def probabilities(logits: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution [vocab] (float64, sums to 1) that ``settings`` define on ``logits`` [vocab]."""
    vocab = logits.shape[-1]
    if settings.greedy:
        p = np.zeros(vocab, dtype=np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    scaled = logits.astype(np.float64) / settings.temperature
    if settings.top_k and settings.top_k < vocab:
        keep = _top_k_mask(scaled, settings.top_k)
        masked = np.full(vocab, -np.inf)
        masked[keep] = scaled[keep]
        scaled = masked
    p = softmax(scaled)
    if settings.top_p < 1.0:
        n_cand = min(vocab, _TOP_P_CANDIDATES)
        cand = _top_k_mask(p, n_cand) if n_cand < vocab else np.arange(vocab)
        if p[cand].sum() < settings.top_p:  # the candidates do not hold enough mass: use everything
            cand = np.arange(vocab)
        keep = _nucleus(p, cand, settings.top_p)
        out = np.zeros(vocab, dtype=np.float64)
        out[keep] = p[keep]
        p = out / out.sum()
    return p


def next_token(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """Draw the next token from ``probabilities(logits, settings)``, with a fast path for greedy.

    Greedy is exactly the same draw as ``sample(probabilities(...))`` (a one-hot distribution can only
    yield its argmax; ties go to the first index in both) without building a vocab-sized float64 array
    and its cumsum, which is most of a decode step's time outside the forward pass on a small model.
    Greedy draws consume no random numbers (their value never mattered). Sampled draws are unchanged:
    the same seed gives the same tokens as before.
    """
    if settings.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, settings), rng)


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one index from ``p`` (any non-negative weights) by inverse CDF: one uniform per draw."""
    cum = np.cumsum(p)
    return int(min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), len(p) - 1))

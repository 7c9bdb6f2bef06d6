"""Sampling settings and logits → distribution → token, in numpy (vectorized, no torch).

One implementation of the rule that turns logits into the distribution a token is drawn from:
temperature, then top-k, then top-p (nucleus), renormalized; temperature 0 means greedy (one-hot at the
argmax). Among equal values the lower token id ranks first, in top-k and top-p alike (and in the codec,
``proto.distribution``, which selects its top entries with :func:`top_k_ids` too).

At a 150k vocabulary the work outside the model forward must stay well under a millisecond, so nothing
here sorts or partitions the whole vocabulary unless the answer spans most of it: :func:`top_k_ids`
guesses a threshold from a strided subsample, keeps the few entries at or above it (one compare pass)
and partitions only those; top-p sorts only the values of such a candidate set. ``np.argpartition``
over the vocabulary is avoided on purpose: it degenerates to milliseconds on many equal values, and a
distribution after top-k or greedy is ~150k exact zeros. Every fast path gives bit for bit what a full
stable sort gives (tests/test_big_vocab.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TOP_P_CANDIDATES = 256  # top-p first looks at about this many of the largest probabilities
_SUBSAMPLE = 4096  # about this many entries (every stride-th one) guess a selection threshold


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
    return _softmax_in_place(logits.astype(np.float64, copy=True))


def _softmax_in_place(z: np.ndarray) -> np.ndarray:
    """softmax of float64 ``z`` along the last axis, computed in ``z`` itself (saves a [V] copy per token)."""
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


# ----------------------------------------------------------------------------------------------------
# Selecting the largest entries without touching all of V more than once or twice
# ----------------------------------------------------------------------------------------------------


def _subsample(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(every stride-th entry of ``values`` [V], stride): about ``_SUBSAMPLE`` entries, all of V when small."""
    stride = max(1, values.shape[-1] // _SUBSAMPLE)
    return values[::stride], stride


def _at_or_above(values: np.ndarray, threshold: float, floor: float) -> np.ndarray:
    """Ascending ids of the entries ``>= threshold``; of every entry ``> floor`` when the threshold is not
    above the floor (or is NaN). Comparisons skip NaN entries."""
    if threshold > floor:
        return np.flatnonzero(values >= threshold)
    return np.flatnonzero(values > floor)


def _lowest_ids_first(vals: np.ndarray, n: int, cutoff: float) -> np.ndarray:
    """Positions (ascending) of the ``n`` entries of ``vals`` ranked first by (value descending, position
    ascending), given that the ``n``-th of them has the value ``cutoff``: everything above it, then the
    lowest positions among the entries equal to it."""
    keep = vals > cutoff
    ties = np.flatnonzero(vals == cutoff)[: n - np.count_nonzero(keep)]
    keep[ties] = True
    return np.flatnonzero(keep)


def top_k_ids(values: np.ndarray, k: int, floor: float = -np.inf) -> np.ndarray:
    """Ascending ids (int64) of the ``k`` largest entries of ``values`` [V] that are ``> floor`` (all of
    them when there are fewer); among entries equal to the k-th largest value the lowest ids are taken.
    NaN entries are never selected.

    The threshold is the r-th largest of every stride-th entry, with r chosen so that about 4k entries
    of V lie at or above it; one compare pass finds them, and only they are partitioned. The guess only
    affects speed: when fewer than k entries reach it, every entry above ``floor`` is a candidate. The
    subsample is sorted, not partitioned: a few thousand mostly equal values (zeros) are exactly what
    makes partitioning slow.
    """
    sample, stride = _subsample(values)
    r = min(sample.size, -(-4 * k // stride) + 4)
    guess = np.sort(sample)[sample.size - r]
    cand = _at_or_above(values, guess, floor)  # [c] ascending
    if cand.size < k and guess > floor:  # the guess was too high
        cand = np.flatnonzero(values > floor)
    if cand.size <= k:
        return cand
    vals = values[cand]  # [c]
    kth = np.partition(vals, cand.size - k)[cand.size - k]  # the k-th largest value
    return cand[_lowest_ids_first(vals, k, kth)]


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending ids of the smallest prefix of ``probs`` [V] (by probability descending, then id
    ascending) whose sequential cumulative sum reaches ``top_p``; every nonzero id if none does.

    Candidates are the entries at or above a threshold (so they are a prefix of that order, whatever it
    is); only their values are sorted, and the cumulative sum over them is the very one a full sort
    would give. First about ``_TOP_P_CANDIDATES`` of the largest entries (enough for a confident
    position); when they fall short, the subsample estimates how far down the missing mass lies.
    """
    sample, stride = _subsample(probs)
    sample = np.sort(sample)[::-1]  # [S] descending
    r = min(sample.size + 1, -(-_TOP_P_CANDIDATES // stride) + 4)  # rank in the subsample
    while True:
        guess = sample[r - 1] if r <= sample.size else 0.0
        cand = _at_or_above(probs, guess, 0.0)  # [c] ascending
        if cand.size == 0:  # no positive entry at all (NaN logits): nothing to keep
            return cand
        vals = probs[cand]  # [c]
        ranked = np.sort(vals)[::-1]  # [c] descending: the first c values of the full order
        cum = np.cumsum(ranked)  # [c]
        if cum[-1] >= top_p or not guess > 0:  # reached, or every nonzero entry is a candidate
            n = min(cand.size, int(np.searchsorted(cum, top_p)) + 1)
            return cand[_lowest_ids_first(vals, n, ranked[n - 1])]
        # Short by top_p - cum[-1]: the subsample's entries below the guess, scaled by the stride,
        # estimate how many more it takes; aim a quarter further so one more pass nearly always does.
        more = np.cumsum(sample[r:]) * stride
        r += int(np.searchsorted(more, top_p - cum[-1])) + 1
        r = min(sample.size + 1, r + r // 4 + 8)


# ----------------------------------------------------------------------------------------------------
# Logits -> distribution -> token
# ----------------------------------------------------------------------------------------------------


def _top_k_softmax(scaled: np.ndarray, k: int) -> np.ndarray:
    """softmax of ``scaled`` [V] with every entry outside its top k set to -inf, computing exp only on
    the k kept entries.

    Bit for bit the dense computation (``softmax`` of the masked logits): the kept entries go through the
    same subtract and exp, the others are exactly ``exp(-inf) = 0``, and the normalizer is summed over
    the same dense [V] array, so the pairwise summation adds the same values in the same order. The
    result is written over ``scaled``.
    """
    top = scaled.max()
    if np.isnan(top):  # NaN logits: argpartition used to keep them (NaN sorts last), p was all NaN
        return _softmax_in_place(scaled)
    keep = top_k_ids(scaled, k)
    kept = scaled[keep]  # [k]
    if not np.isfinite(top):  # +inf (inf - inf) or all -inf logits: the dense path's NaNs, as before
        scaled.fill(-np.inf)
        scaled[keep] = kept
        return _softmax_in_place(scaled)
    p = scaled  # [V] reused rather than a second [V] array (see probabilities)
    p.fill(0.0)
    p[keep] = np.exp(kept - top)  # top is among the kept: the masked array's max
    p[keep] /= p.sum()
    return p


def probabilities(logits: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution [vocab] (float64, sums to 1) that ``settings`` define on ``logits`` [vocab].

    One [vocab] float64 array is allocated and every step works in it: besides the passes saved, two
    1.2 MB blocks freed together at a 150k vocabulary make glibc return the memory to the kernel, and
    faulting it back in costs about a millisecond per token in a small VM.
    """
    vocab = logits.shape[-1]
    if settings.greedy:
        p = np.zeros(vocab, dtype=np.float64)
        p[int(np.argmax(logits))] = 1.0
        return p
    p = logits.astype(np.float64)  # [V] a fresh copy, scaled and exponentiated in place
    if settings.temperature != 1.0:  # x / 1.0 == x exactly: skipping it saves a pass
        p /= settings.temperature
    if settings.top_k and settings.top_k < vocab:
        p = _top_k_softmax(p, settings.top_k)
    else:
        p = _softmax_in_place(p)
    if settings.top_p < 1.0:
        keep = _nucleus(p, settings.top_p)
        if keep.size == 0:  # no positive entry: p is NaN (NaN logits) and stays so
            return p
        kept = p[keep]
        p.fill(0.0)
        p[keep] = kept
        # Summed over the dense [V] array as before (the pairwise sum's order depends on the positions);
        # the zeros need no dividing.
        p[keep] = kept / p.sum()
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

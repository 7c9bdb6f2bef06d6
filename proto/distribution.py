"""What ``p~`` is: the codec spec, ``compress(p) -> p~`` and exact draws from ``p~`` (used by the edge).

The bytes that carry ``p~`` over the wire are in :mod:`proto.payload` (used by both sides); this module
never touches bytes, so the edge's hot loop reads as "form p, compress, draw".

Glossary (docs/design.md, "The per-token protocol"):

- ``p``: the SLM distribution at one position, float64 ``[V]``, after temperature / top-k / top-p; may
  hold exact zeros.
- ``p~``: what :func:`compress` makes of ``p``. An *exact* distribution: integer weights over a common
  integer total (``topk``, ``adaptive``), or float64 weights over their float64 sum (``full32``,
  ``full16``). The edge draws its draft from ``p~`` (:meth:`Compressed.sample`), never from ``p``, and
  the cloud runs rejection sampling against ``p~`` (:meth:`Compressed.dense`). Rejection sampling is
  only exact if both sides use the very same ``p~``; :mod:`proto.payload` guarantees
  ``decode(encode(compress(p))) == compress(p)``.

Codecs (the wire layout of each is in :mod:`proto.payload`):

``full32`` / ``full16``  every vocabulary entry as a float; ``p~ = f / sum(f)`` over the nonzero values.
``topk``    the ``k`` largest entries, integer counts summing to exactly 255 (shares that round to 0 are
            sent with count 0 and are not in the support).
``adaptive`` the smallest top set holding mass ``>= 1 - eps`` of ``p``, capped at ``k_max`` entries,
            ``bits``-bit counts summing to exactly ``2**bits``, each >= 1.

Tie-breaking is deterministic everywhere: among equal probabilities the lower token id ranks first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from core.sampling import top_k_ids

CODEC_NAMES = ("full32", "full16", "topk", "adaptive")

TOPK_TOTAL = 255  # topk counts are uint8 and sum to exactly this
MAX_VOCAB = 2**32  # topk indices are uint32
FLOAT_DTYPES = {"full32": np.dtype("<f4"), "full16": np.dtype("<f2")}
FLOAT16_MAX = 65504.0  # the largest finite float16; anything that rounds above it overflows to inf


# ----------------------------------------------------------------------------------------------------
# Specification
# ----------------------------------------------------------------------------------------------------


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class CodecSpec:
    """Which codec, with its parameters. Both sides must use the same spec (it is not on the wire)."""

    name: str
    k: int = 30  # topk: number of entries
    eps: float = 0.01  # adaptive: tail mass allowed outside the top set
    k_max: int = 64  # adaptive: cap on the top set
    bits: int = 12  # adaptive: probabilities are b-bit integers summing to 2**bits

    def __post_init__(self):
        if self.name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {self.name!r}; known codecs: {', '.join(CODEC_NAMES)}")
        if not is_int(self.k) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.name == "topk" and self.k > TOPK_TOTAL:
            # n travels as a uint8, and every kept entry needs a count >= 1 out of 255.
            raise ValueError(f"topk: k must be <= {TOPK_TOTAL} (n is a uint8 and counts sum to 255), "
                             f"got {self.k}")
        if not isinstance(self.eps, numbers.Real) or isinstance(self.eps, bool) or not 0 <= self.eps < 1:
            raise ValueError(f"eps must be a number with 0 <= eps < 1, got {self.eps!r}")
        if not is_int(self.k_max) or self.k_max < 1:
            raise ValueError(f"k_max must be an integer >= 1, got {self.k_max!r}")
        if not is_int(self.bits) or not 2 <= self.bits <= 24:
            raise ValueError(f"bits must be an integer with 2 <= bits <= 24, got {self.bits!r}")
        if self.name == "adaptive" and self.k_max > 2**self.bits:
            # Every kept entry gets a count >= 1 and the counts sum to 2**bits.
            raise ValueError(f"adaptive: k_max={self.k_max} entries cannot each get a count >= 1 out of "
                             f"2**bits={2**self.bits}; raise bits to >= {math.ceil(math.log2(self.k_max))} "
                             f"or lower k_max")

    @property
    def is_float(self) -> bool:
        """True for the codecs that send every vocabulary entry as a float."""
        return self.name in FLOAT_DTYPES


# ----------------------------------------------------------------------------------------------------
# The compressed distribution p~
# ----------------------------------------------------------------------------------------------------


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view, so a Compressed cannot change under the sampler (the caller's array stays as is)."""
    v = a.view()
    v.setflags(write=False)
    return v


@dataclass(frozen=True, eq=False)
class Compressed:
    """``p~``: probability ``weights[i] / total`` on token ``support[i]``, zero elsewhere.

    ``eq=False`` because the dataclass-generated ``__eq__`` cannot compare arrays; ``==`` is defined
    below as exact equality (support, weights and their dtype, total).
    """

    support: np.ndarray  # int64 [n] token ids, ascending, unique
    weights: np.ndarray  # [n] >= 0: int64 (topk, adaptive) or float64 (full32, full16)
    total: float | int  # weights.sum(); int for the integer codecs; > 0

    def __post_init__(self):
        support = np.asarray(self.support)
        weights = np.asarray(self.weights)
        if support.ndim != 1 or support.size == 0 or support.shape != weights.shape:
            raise ValueError(f"support and weights must be non-empty 1-D arrays of one length, got shapes "
                             f"{support.shape} and {weights.shape}")
        if not np.issubdtype(support.dtype, np.integer):
            raise ValueError(f"support must hold integer token ids, got dtype {support.dtype}")
        if not (self.total > 0):
            raise ValueError(f"total must be > 0, got {self.total!r}")
        object.__setattr__(self, "support", _frozen(support.astype(np.int64, copy=False)))
        object.__setattr__(self, "weights", _frozen(weights))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Compressed):
            return NotImplemented
        return (self.weights.dtype == other.weights.dtype and self.total == other.total
                and np.array_equal(self.support, other.support) and np.array_equal(self.weights, other.weights))

    __hash__ = None  # holds arrays: unhashable, like an ndarray

    @property
    def is_integer(self) -> bool:
        return np.issubdtype(self.weights.dtype, np.integer)

    def _position(self, token: int) -> int:
        """Index of ``token`` in ``support``, or -1."""
        i = int(np.searchsorted(self.support, token))
        return i if i < self.support.size and self.support[i] == token else -1

    def contains(self, token: int) -> bool:
        """Whether ``token`` has positive probability (topk may carry entries of count 0)."""
        i = self._position(token)
        return i >= 0 and self.weights[i] > 0

    def prob(self, token: int) -> float:
        """``p~(token)``: ``weights[i] / total``, 0.0 off the support."""
        i = self._position(token)
        return float(self.weights[i] / self.total) if i >= 0 else 0.0

    def dense(self, vocab_size: int) -> np.ndarray:
        """``p~`` as float64 ``[V]``: exactly the array rejection sampling compares ``q`` against."""
        if self.support[-1] >= vocab_size:
            raise ValueError(f"support holds token {int(self.support[-1])} but vocab_size is {vocab_size}")
        out = np.zeros(vocab_size, dtype=np.float64)  # [V]
        out[self.support] = self.weights / self.total
        return out

    def sample(self, rng: np.random.Generator) -> int:
        """One exact draw from ``p~`` (a zero-weight entry is never drawn).

        Integer weights: ``r`` uniform on ``{0, ..., total-1}``, bucket ``i`` owns ``[cum[i-1], cum[i])``,
        so the draw is exact. Float weights: ``u = random() * cum[-1]`` on the float64 cumsum; ``cum[-1]``
        rather than ``total`` because the sequential cumsum and the pairwise ``sum`` may differ in the
        last bit, and ``u`` must fall inside ``[0, cum[-1])``.
        """
        cum = np.cumsum(self.weights)  # [n]
        if self.is_integer:
            r = int(rng.integers(self.total))
            return int(self.support[np.searchsorted(cum, r, side="right")])
        u = rng.random() * cum[-1]
        i = int(np.searchsorted(cum, u, side="right"))
        if i >= cum.size:  # u rounded up to cum[-1]: it belongs to the last positive-weight bucket
            i = int(np.flatnonzero(self.weights)[-1])
        return int(self.support[i])


# ----------------------------------------------------------------------------------------------------
# compress: p -> p~
# ----------------------------------------------------------------------------------------------------


def _check_distribution(p) -> tuple[np.ndarray, float]:
    """``p`` as float64 ``[V]`` and its sum; ValueError unless finite, non-negative, positive sum.

    Two reductions instead of isfinite/any passes: ``min`` propagates NaN and ``sum`` propagates inf.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p must be a non-empty 1-D array [V], got shape {p.shape}")
    if p.size > MAX_VOCAB:
        raise ValueError(f"vocabulary of {p.size} entries exceeds the codec limit of 2**32")
    lowest = p.min()
    total = float(p.sum())
    if not lowest >= 0:
        raise ValueError(f"p must be non-negative and free of NaN, got min {lowest}")
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"p must have a finite positive sum, got {total}")
    return p, total


def _top_entries(p: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` largest *nonzero* entries of ``p``: ids int64 [m'] and values float64 [m'], m' <= m,
    ordered by probability descending, then token id ascending.

    :func:`core.sampling.top_k_ids` picks the set (linear time; among entries tied with the m-th largest
    value the lowest ids win), so only the m' picked entries are sorted. Not ``np.argpartition`` over
    ``V``: after top-k, top-p or greedy, ``p`` is ~all exact zeros, and argpartition degenerates on ties
    (milliseconds at a 150k vocabulary).
    """
    ids = top_k_ids(p, m, floor=0.0).astype(np.int64, copy=False)
    vals = p[ids]
    order = np.lexsort((ids, -vals))  # primary: value descending; secondary: id ascending
    return ids[order], vals[order]


def quantize(vals: np.ndarray, total: int, raise_zeros: bool = True) -> np.ndarray:
    """Integer counts int64 [n] summing to exactly ``total``, proportional to ``vals``; each >= 1 unless
    ``raise_zeros`` is False (then entries may round to 0 and the caller drops them).

    ``vals``: positive float64 [n], in rank order (probability descending, then id ascending); ties in
    the rounding go to the earlier entry, so the result is deterministic. Largest-remainder rounding of
    ``vals / sum(vals) * total``; then every entry that rounded to 0 is raised to 1 (an entry in the
    support must be drawable, and rejection sampling divides by ``p~(x)``) and the excess is taken from
    the largest counts, which suffer the least relative error. Requires ``n <= total``.
    """
    n = vals.size
    if raise_zeros and n > total:
        raise ValueError(f"cannot give {n} entries a count >= 1 out of {total}")
    share = vals / vals.sum() * total  # [n] exact (real-valued) counts
    counts = np.floor(share).astype(np.int64)  # [n]
    short = total - int(counts.sum())  # units still to hand out, 0 <= short <= n up to rounding
    counts += short // n  # only reached through float rounding; keeps the next line in range
    short %= n
    remainder_rank = np.argsort(-(share - np.floor(share)), kind="stable")  # [n] largest remainder first
    counts[remainder_rank[:short]] += 1
    zero = counts == 0  # [n]
    deficit = int(zero.sum()) if raise_zeros else 0
    if deficit:
        counts[zero] = 1
        for i in np.argsort(-counts, kind="stable"):  # largest count first; stops after one or two
            take = min(deficit, int(counts[i]) - 1)
            counts[i] -= take
            deficit -= take
            if deficit == 0:
                break
    return counts


def _float16_grid(x: np.ndarray) -> np.ndarray:
    """``x.astype(float16).astype(float64)`` for finite ``x >= 0`` [n], bit for bit, in float64 arithmetic.

    numpy's float64 -> float16 cast takes ~70 ns an entry when entries underflow (11 ms for a temperature-1
    distribution over 150k tokens); this takes ~1 ns. Adding and subtracting ``c = 1.5 * 2**(52 + s)``
    rounds ``x`` to a multiple of ``2**s`` with ties to even, the IEEE rounding of the cast, when
    ``2**s`` is float16's spacing at ``x``: ``2**(e - 10)`` for ``x`` in ``[2**e, 2**(e + 1))``, and
    ``2**-24`` below ``2**-14`` (subnormals). Building ``c`` from ``x``'s exponent bits needs no log2;
    the exponent is clamped to [-14, 16]: -14 for the subnormals' fixed spacing, 16 so that ``c`` stays
    finite (anything that large overflows anyway).
    """
    exponent = x.view(np.int64) & np.int64(0x7FF0000000000000)  # [n] biased exponent, still in place
    np.clip(exponent, (1023 - 14) << 52, (1023 + 16) << 52, out=exponent)
    exponent += (52 - 10) << 52 | 1 << 51  # exponent + 42 with the top mantissa bit: 1.5 * 2**(e + 42)
    c = exponent.view(np.float64)  # [n]
    out = x + c
    out -= c
    out[out > FLOAT16_MAX] = np.inf
    return out


def _round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` [n] rounded to ``dtype`` as the wire carries it: float32 values, or float16 values held in float64."""
    if dtype == np.float16:
        return _float16_grid(x)
    with np.errstate(over="ignore"):  # overflow is reported by the caller, as a ValueError
        return x.astype(dtype)


def _compress_float(p: np.ndarray, dtype: np.dtype) -> Compressed:
    # After top-k, top-p or greedy only a few entries are nonzero: round just those (one compare pass);
    # rounding all of V costs more than finding them. Either way the same values end up at the same ids.
    positive = p > 0  # [V]
    ids = np.flatnonzero(positive) if np.count_nonzero(positive) * 8 < p.size else None
    values = _round_to(p if ids is None else p[ids], dtype)  # [V] or [n]
    if not np.isfinite(values).all():
        raise ValueError(f"p overflows {dtype.name}; pass a normalized distribution")
    c = from_float_values(values, ids)
    if c is None:
        raise ValueError(f"every entry of p underflows to 0 in {dtype.name}")
    return c


def from_float_values(values: np.ndarray, ids: np.ndarray | None = None) -> Compressed | None:
    """``p~`` of a float vector as sent on the wire (None when it is all zero): ``values`` [V], or
    ``values`` [n] at tokens ``ids`` [n] (ascending) with every other token 0.

    Shared by compress and decode so that both compute the same support, weights and total: the total
    is the sum of the nonzero weights, taken the same way on both sides.
    """
    nonzero = np.flatnonzero(values != 0)  # [n'] a bool mask: much faster than nonzero() on floats
    if nonzero.size == 0:
        return None
    weights = values[nonzero].astype(np.float64)  # [n'] exact: float32/16 -> float64 is lossless
    support = nonzero if ids is None else ids[nonzero]
    return Compressed(support, weights, float(weights.sum()))


def _compressed_from_ranked(ids: np.ndarray, counts: np.ndarray, total: int) -> Compressed:
    """Compressed from rank-ordered ids and counts: the wire wants the support ascending."""
    order = np.argsort(ids)  # [n]
    return Compressed(ids[order], counts[order], total)


def _compress_topk(p: np.ndarray, spec: CodecSpec) -> Compressed:
    ids, vals = _top_entries(p, spec.k)
    # Fixed k on the wire (the CU-HLM-like baseline), but a share that rounds to 0 of 255 stays 0
    # instead of being raised to 1: raising would give every one of the 30 entries at least 1/255 (0.4%),
    # so a confident position would draw a near-impossible draft ~10% of the time, and a
    # draft-independent policy skips exactly those confident positions. Zero-count entries are sent but
    # are not in the support of p~ (never drawn, never verifiable). The top entry always keeps >= 1.
    counts = quantize(vals, TOPK_TOTAL, raise_zeros=False)
    return _compressed_from_ranked(ids, counts, TOPK_TOTAL)


def _compress_adaptive(p: np.ndarray, p_sum: float, spec: CodecSpec) -> Compressed:
    ids, vals = _top_entries(p, spec.k_max)  # [m] rank order, m <= k_max, zeros excluded
    cum = np.cumsum(vals)  # [m]
    # Smallest prefix reaching 1 - eps; when none does within k_max (or rounding keeps cum a hair short
    # of p_sum with eps = 0), keep all m candidates.
    n = min(int(np.searchsorted(cum, (1.0 - spec.eps) * p_sum, side="left")) + 1, ids.size)
    total = 2**spec.bits
    return _compressed_from_ranked(ids[:n], quantize(vals[:n], total), total)


def compress(p: np.ndarray, spec: CodecSpec) -> Compressed:
    """``p~`` of ``p`` (float [V], sums to 1, may hold zeros): exactly what ``decode(encode(.))`` returns.

    The edge samples its draft from this result directly; encoding it does not change it.
    """
    p, p_sum = _check_distribution(p)
    if spec.is_float:
        return _compress_float(p, FLOAT_DTYPES[spec.name])
    if spec.name == "topk":
        return _compress_topk(p, spec)
    return _compress_adaptive(p, p_sum, spec)

"""The per-token fast paths at a 150k vocabulary give exactly what a straightforward full sort gives.

``core.sampling`` (top-k, top-p), the codec (``proto.distribution``: top entries, float16 rounding) and
the closed-form uncertainty estimators avoid sorting, partitioning or BLAS over the whole vocabulary
(``bench/vocab_costs.py`` measures them). Each is checked here against a reference written the obvious
way (a full stable sort by probability descending, then id ascending; numpy's own float16 cast), bit for
bit where the result feeds ``p``, ``p~`` or a draw: on small vocabularies with many exact ties and
zeros, on vocabularies large enough that the strided subsample guesses thresholds (including layouts
that fool the guess), and at Qwen2.5-0.5B's ``V = 151,936``. Nothing here measures time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.sampling import SamplingSettings, probabilities, softmax, top_k_ids
from edge.uncertainty import get_estimator
from proto.distribution import (
    CODEC_NAMES,
    FLOAT_DTYPES,
    CodecSpec,
    Compressed,
    _float16_grid,
    _top_entries,
    compress,
    quantize,
)
from proto.payload import decode, encode
from tests.test_codec import SPECS as CODEC_SPECS
from tests.test_codec import assert_same, distributions

QWEN_VOCAB = 151_936
PROPERTY = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
# The codec tests' specs whose top set is small, plus one whose k_max reaches past the subsample (its fallback).
SPECS = [*(s for s in CODEC_SPECS if s.k_max < 255), CodecSpec("adaptive", eps=0.0, k_max=20_000, bits=16)]
SETTINGS = [
    SamplingSettings(),
    SamplingSettings(temperature=0.7),
    SamplingSettings(top_k=1),
    SamplingSettings(top_k=50),
    SamplingSettings(top_k=20_000),
    SamplingSettings(top_p=0.5),
    SamplingSettings(top_p=0.9),
    SamplingSettings(temperature=0.7, top_k=20, top_p=0.8),  # Qwen2.5's generation config
    SamplingSettings(temperature=1.3, top_k=5000, top_p=0.99),
    SamplingSettings(temperature=0),
]


# ----------------------------------------------------------------------------------------------------
# References: a full stable sort, numpy's own casts
# ----------------------------------------------------------------------------------------------------


def ranked(values: np.ndarray) -> np.ndarray:
    """Every id of ``values`` [V] by value descending, then id ascending."""
    return np.lexsort((np.arange(values.size), -values))


def reference_probabilities(logits: np.ndarray, s: SamplingSettings) -> np.ndarray:
    """core.sampling.probabilities with full sorts and a dense mask (the logic before the fast paths)."""
    vocab = logits.shape[-1]
    if s.greedy:
        p = np.zeros(vocab)
        p[int(np.argmax(logits))] = 1.0
        return p
    scaled = logits.astype(np.float64) / s.temperature
    if s.top_k and s.top_k < vocab:
        keep = ranked(scaled)[: s.top_k]
        masked = np.full(vocab, -np.inf)
        masked[keep] = scaled[keep]
        scaled = masked
    p = softmax(scaled)
    if s.top_p < 1.0:
        order = ranked(p)
        cum = np.cumsum(p[order])
        keep = order[: min(vocab, int(np.searchsorted(cum, s.top_p)) + 1)]
        out = np.zeros(vocab)
        out[keep] = p[keep]
        p = out / out.sum()
    return p


def reference_top_entries(p: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    nonzero = np.flatnonzero(p)
    ids = nonzero[ranked(p[nonzero])[:m]]
    return ids, p[ids]


def reference_compress(p: np.ndarray, spec: CodecSpec) -> Compressed:
    """compress() with numpy's float casts and a full sort for the top entries."""
    if spec.is_float:
        with np.errstate(over="ignore", under="ignore"):
            values = p.astype(FLOAT_DTYPES[spec.name])
        support = np.flatnonzero(values)
        weights = values[support].astype(np.float64)
        return Compressed(support, weights, float(weights.sum()))
    if spec.name == "topk":
        ids, vals = reference_top_entries(p, spec.k)
        counts, total = quantize(vals, 255, raise_zeros=False), 255
    else:
        ids, vals = reference_top_entries(p, spec.k_max)
        n = min(int(np.searchsorted(np.cumsum(vals), (1.0 - spec.eps) * float(p.sum()))) + 1, ids.size)
        ids, total = ids[:n], 2**spec.bits
        counts = quantize(vals[:n], total)
    order = np.argsort(ids)
    return Compressed(ids[order], counts[order], total)


# ----------------------------------------------------------------------------------------------------
# Inputs: large enough for the strided subsample (stride >= 2 from V = 8192 on)
# ----------------------------------------------------------------------------------------------------


def layout(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Raw float64 scores [size] of one of several shapes; see ``large_scores``."""
    stride = max(1, size // 4096)
    if kind == "normal":
        return rng.standard_normal(size) * rng.uniform(0.1, 6.0)
    if kind == "ties":  # few distinct values: huge tie groups straddle every boundary
        return rng.integers(0, 4, size).astype(np.float64)
    if kind == "peaked":
        x = rng.standard_normal(size) * 2
        x[rng.choice(size, 5, replace=False)] += rng.uniform(5, 25, 5)
        return x
    # The large scores sit only on ids the subsample sees (it over-estimates them) or only on ids it
    # never sees (it under-estimates them): the guessed thresholds are off, the results must not be.
    x = rng.standard_normal(size) * 0.5
    seen = np.arange(0, size, stride)
    ids = seen if kind == "seen" else (seen + 1)[seen + 1 < size]
    x[ids] += rng.uniform(2, 8, ids.size)
    return x


@st.composite
def large_scores(draw) -> np.ndarray:
    """float64 logits [V], V in 8192..40000, of a random shape, some masked to -inf."""
    size = draw(st.integers(8192, 40_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = layout(rng, size, draw(st.sampled_from(["normal", "ties", "peaked", "seen", "unseen"])))
    x[rng.random(size) < draw(st.sampled_from([0.0, 0.0, 0.5, 0.999]))] = -np.inf  # masked ids
    if np.isneginf(x).all():
        x[draw(st.integers(0, size - 1))] = 0.0
    return x


def as_distribution(scores: np.ndarray) -> np.ndarray:
    """Scores -> a normalized p with exact zeros where the score is -inf (and exact ties where equal)."""
    return softmax(scores)


def qwen_logits(kind: str, seed: int = 0) -> np.ndarray:
    """float32 logits [151,936] of one layout, as the SLM's forward returns them."""
    return layout(np.random.default_rng(seed), QWEN_VOCAB, kind).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------


@PROPERTY
@given(p=distributions(), m=st.sampled_from([1, 2, 30, 64, 255, 1000]))
def test_top_entries_match_full_sort_small(p, m):
    ids, vals = _top_entries(p, m)
    ref_ids, ref_vals = reference_top_entries(p, m)
    assert ids.dtype == np.int64 and vals.dtype == np.float64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vals, ref_vals)


@PROPERTY
@given(scores=large_scores(), m=st.sampled_from([1, 30, 64, 255, 5000, 30_000]))
def test_top_entries_match_full_sort_large(scores, m):
    p = as_distribution(scores)
    ids, vals = _top_entries(p, m)
    ref_ids, ref_vals = reference_top_entries(p, m)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(vals, ref_vals)


@PROPERTY
@given(scores=large_scores(), k=st.sampled_from([1, 7, 50, 1000, 39_999]),
       floor=st.sampled_from([-np.inf, 0.0, 1.0]))
def test_top_k_ids_is_the_k_largest_above_the_floor(scores, k, floor):
    scores = scores.copy()
    scores[:: 97] = np.nan  # never selected, whatever the floor
    ids = top_k_ids(scores, k, floor)
    eligible = np.flatnonzero(scores > floor)
    expected = np.sort(eligible[ranked(scores[eligible])[:k]])
    np.testing.assert_array_equal(ids, expected)


# ----------------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------------


def test_float16_grid_is_numpys_cast_bit_for_bit():
    """Every finite non-negative float16, every midpoint between neighbours (ties to even) and the
    doubles just either side of it, the overflow edge and random bit patterns over the whole range."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # [31744]
    mids = (halves[1:] + halves[:-1]) / 2
    edges = np.array([0.0, 5e-324, 2.0**-25, np.nextafter(2.0**-25, 1), 2.0**-24, 2.0**-14, 65504.0,
                      np.nextafter(65520.0, 0), 65520.0, 65536.0, 1e300, np.finfo(np.float64).max])
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7FF0000000000000, 200_000, dtype=np.uint64).view(np.float64)  # finite, >= 0
    scaled = np.ldexp(rng.random(200_000), rng.integers(-30, 18, 200_000))  # around float16's range
    for x in (halves, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), edges, bits, scaled):
        with np.errstate(over="ignore", under="ignore"):
            expected = x.astype(np.float16).astype(np.float64)
        np.testing.assert_array_equal(_float16_grid(x), expected)


@PROPERTY
@given(p=distributions())
@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.name}-k{s.k}-eps{s.eps}-kmax{s.k_max}" for s in SPECS])
def test_compress_matches_reference_small(spec, p):
    assert_same(compress(p, spec), reference_compress(p, spec))


@PROPERTY
@given(scores=large_scores())
@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.name}-k{s.k}-eps{s.eps}-kmax{s.k_max}" for s in SPECS])
def test_compress_matches_reference_large(spec, scores):
    p = as_distribution(scores)
    assert_same(compress(p, spec), reference_compress(p, spec))


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "unseen"])
@pytest.mark.parametrize("settings_", [SamplingSettings(), SamplingSettings(top_k=50),
                                       SamplingSettings(top_p=0.9), SamplingSettings(temperature=0)],
                         ids=["temp1", "topk50", "topp0.9", "greedy"])
def test_qwen_vocabulary_codecs_match_reference(kind, settings_):
    p = probabilities(qwen_logits(kind), settings_)
    for name in CODEC_NAMES:
        spec = CodecSpec(name)
        c = compress(p, spec)
        assert_same(c, reference_compress(p, spec))
        assert_same(decode(encode(c, spec, QWEN_VOCAB), spec, QWEN_VOCAB), c)


# ----------------------------------------------------------------------------------------------------
# Sampling settings -> p
# ----------------------------------------------------------------------------------------------------


@st.composite
def small_logits(draw) -> np.ndarray:
    """Logits [2..2000] with exact ties, -inf entries, float32 or float64."""
    size = draw(st.integers(2, 2000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "peaked"]))
    x = layout(rng, size, kind) if kind != "peaked" or size >= 5 else rng.standard_normal(size)
    x[rng.random(size) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = -np.inf
    if np.isneginf(x).all():
        x[0] = 0.0
    return x.astype(draw(st.sampled_from([np.float32, np.float64])))


@PROPERTY
@given(logits=small_logits(), index=st.integers(0, len(SETTINGS) - 1))
def test_probabilities_match_full_sort_small(logits, index):
    s = SETTINGS[index]
    np.testing.assert_array_equal(probabilities(logits, s), reference_probabilities(logits, s))


@PROPERTY
@given(scores=large_scores(), index=st.integers(0, len(SETTINGS) - 1))
def test_probabilities_match_full_sort_large(scores, index):
    s = SETTINGS[index]
    np.testing.assert_array_equal(probabilities(scores, s), reference_probabilities(scores, s))


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "seen", "unseen"])
def test_qwen_vocabulary_probabilities_match_full_sort(kind):
    logits = qwen_logits(kind, seed=1)
    for s in SETTINGS:
        np.testing.assert_array_equal(probabilities(logits, s), reference_probabilities(logits, s))


def test_top_k_and_top_p_ties_go_to_the_lowest_ids_at_qwen_vocabulary():
    """Tie groups straddling the top-k and the top-p boundary, far beyond any candidate set: the lowest
    ids among the tied entries are kept."""
    big = [5, 70_000, 151_000]
    logits = np.zeros(QWEN_VOCAB, dtype=np.float32)
    logits[big] = 3.0
    p = probabilities(logits, SamplingSettings(top_k=10))
    assert np.flatnonzero(p).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 70_000, 151_000]
    kept = np.flatnonzero(probabilities(logits, SamplingSettings(top_p=0.5)))
    assert np.isin(big, kept).all()
    small = np.setdiff1d(kept, big)  # the tied ones: about half of the vocabulary, 70_000 among them
    assert 70_000 < small.size < QWEN_VOCAB - 3
    np.testing.assert_array_equal(small, np.setdiff1d(np.arange(QWEN_VOCAB), big)[: small.size])


# ----------------------------------------------------------------------------------------------------
# Closed-form uncertainty estimators
# ----------------------------------------------------------------------------------------------------


def reference_u(name: str, logits: np.ndarray) -> float:
    p = softmax(logits)
    if name == "max-prob":
        return 1.0 - p.max()
    if name == "margin":
        top2 = np.sort(p)[-2:]
        return 1.0 - (top2[1] - top2[0])
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


@pytest.mark.parametrize("kind", ["normal", "peaked", "ties", "masked"])
@pytest.mark.parametrize("name", ["entropy", "max-prob", "margin"])
def test_closed_form_estimators_at_qwen_vocabulary(name, kind):
    logits = qwen_logits("normal" if kind == "masked" else kind, seed=2)
    if kind == "masked":
        logits[np.random.default_rng(3).random(QWEN_VOCAB) < 0.5] = -np.inf
    u = get_estimator(name)(logits, 0, np.random.default_rng(0))
    assert u == pytest.approx(reference_u(name, logits), abs=1e-12)


@pytest.mark.parametrize("name", ["entropy", "max-prob", "margin"])
def test_closed_form_estimators_do_not_use_blas(name, monkeypatch):
    """np.dot & co. run on OpenBLAS's thread pool (milliseconds per token on a busy machine at 150k)."""

    def refuse(*args, **kwargs):
        raise AssertionError("BLAS call in a per-token estimator")

    for fn in ("dot", "vdot", "inner", "matmul", "tensordot"):
        monkeypatch.setattr(np, fn, refuse)
    get_estimator(name)(qwen_logits("normal"), 0, np.random.default_rng(0))


def test_vocab_costs_bench_reports_every_stage():
    """bench/vocab_costs.py's structure at a small vocabulary (its numbers are never asserted)."""
    from bench import vocab_costs

    result = vocab_costs.measure(vocab=3000, repeats=2)
    assert result["vocab"] == 3000 and isinstance(result["goal_met"], bool)
    assert set(result["cases"]) == {"normal", "peaked"}
    for case in result["cases"].values():
        assert set(case["uncertainty_us"]) == {"uhlm", "perturb-mode", "entropy", "max-prob", "margin"}
        assert set(case["settings"]) == set(vocab_costs.SETTINGS)
        for row in case["settings"].values():
            for stage in ("compress_us", "sample_us", "total_us"):
                assert set(row[stage]) == set(CODEC_NAMES)
                assert all(us > 0 and math.isfinite(us) for us in row[stage].values())
    assert set(result["over_goal"]) <= {f"{c}/{s}/{n}" for c in result["cases"] for s in vocab_costs.SETTINGS
                                        for n in CODEC_NAMES}

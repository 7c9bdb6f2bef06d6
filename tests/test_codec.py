"""The payload codec: p~ survives the wire bit for bit, keeps what it promises, and bad bytes fail loudly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from proto.distribution import CODEC_NAMES, CodecSpec, Compressed, compress
from proto.payload import CodecError, decode, encode, encoded_size

SPECS = [
    CodecSpec("full32"),
    CodecSpec("full16"),
    CodecSpec("topk"),
    CodecSpec("topk", k=1),
    CodecSpec("topk", k=255),
    CodecSpec("adaptive"),
    CodecSpec("adaptive", eps=0.0),
    CodecSpec("adaptive", eps=0.3, k_max=4, bits=2),
    CodecSpec("adaptive", eps=0.001, k_max=255, bits=8),
    CodecSpec("adaptive", k_max=1000, bits=24),
]
SPEC_IDS = [f"{s.name}-k{s.k}-eps{s.eps}-kmax{s.k_max}-b{s.bits}" for s in SPECS]
PROPERTY = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------------------------


@st.composite
def distributions(draw) -> np.ndarray:
    """float64 [V], V in 2..2000, summing to ~1: random with exact zeros and ties, one-hot, or uniform."""
    size = draw(st.integers(2, 2000))
    kind = draw(st.sampled_from(["random", "random", "ties", "peaked", "one_hot", "uniform", "small"]))
    if kind == "one_hot":
        p = np.zeros(size)
        p[draw(st.integers(0, size - 1))] = 1.0
        return p
    if kind == "uniform":
        return np.full(size, 1.0 / size)
    if kind == "small":  # hypothesis picks every value itself: edge cases numpy draws would miss
        size = min(size, 40)
        values = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-12, 1e3)), min_size=size, max_size=size))
        p = np.array(values)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "ties":  # few distinct values: exercises the lowest-id-first tie-breaking
            p = rng.integers(0, 4, size).astype(np.float64)
        elif kind == "peaked":  # LM-like: a few tokens hold most of the mass, a long tail
            p = np.exp(rng.standard_normal(size) * draw(st.floats(0.5, 6.0)))
        else:
            p = rng.exponential(size=size) ** draw(st.floats(0.5, 8.0))
        p[rng.random(size) < draw(st.floats(0.0, 0.95))] = 0.0  # exact zeros, as after top-k / top-p
    if p.sum() == 0:
        p[draw(st.integers(0, size - 1))] = 1.0
    return p / p.sum()


def assert_same(a: Compressed, b: Compressed) -> None:
    assert a.support.dtype == b.support.dtype == np.int64
    assert a.weights.dtype == b.weights.dtype
    np.testing.assert_array_equal(a.support, b.support)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.total == b.total and type(a.total) is type(b.total)
    assert a == b


# ----------------------------------------------------------------------------------------------------
# Round trip and structural invariants
# ----------------------------------------------------------------------------------------------------


@PROPERTY
@given(p=distributions())
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_round_trip_is_exact(spec, p):
    vocab = p.size
    c = compress(p, spec)
    data = encode(c, spec, vocab)
    assert_same(decode(data, spec, vocab), c)
    # The support is ascending and unique, every weight positive (topk may send count-0 entries), the
    # total their sum.
    assert (np.diff(c.support) > 0).all() and c.support[0] >= 0 and c.support[-1] < vocab
    assert (c.weights >= 0).all() if spec.name == "topk" else (c.weights > 0).all()
    assert c.total == c.weights.sum()
    dense = c.dense(vocab)
    np.testing.assert_array_equal(dense[c.support], c.weights / c.total)
    assert np.count_nonzero(dense) == np.count_nonzero(c.weights)
    assert dense.sum() == pytest.approx(1.0, abs=1e-9)
    assert (p[c.support] > 0).all()  # nothing outside p's support is ever proposed


@PROPERTY
@given(p=distributions())
def test_float_codecs_round_each_entry_and_normalize(p):
    for spec, dtype in ((CodecSpec("full32"), np.float32), (CodecSpec("full16"), np.float16)):
        c = compress(p, spec)
        expected = p.astype(dtype).astype(np.float64)
        np.testing.assert_array_equal(c.support, np.flatnonzero(expected))
        np.testing.assert_array_equal(c.weights, expected[c.support])


@PROPERTY
@given(p=distributions(), eps=st.sampled_from([0.0, 0.01, 0.1, 0.5]), k_max=st.sampled_from([1, 5, 64]))
def test_adaptive_keeps_smallest_top_set_above_one_minus_eps(p, eps, k_max):
    spec = CodecSpec("adaptive", eps=eps, k_max=k_max, bits=12)
    c = compress(p, spec)
    n = c.support.size
    kept = p[c.support]
    nnz = np.count_nonzero(p)
    assert n <= min(k_max, nnz)
    # The kept entries are the largest ones (anything left out is no larger than anything kept).
    rest = np.delete(p, c.support)
    assert rest.size == 0 or rest.max() <= kept.min()
    mass = kept.sum() / p.sum()
    if n < min(k_max, nnz):
        assert mass >= 1 - eps - 1e-12
    # Smallest: without its smallest entry the set falls short of 1 - eps (up to float rounding).
    if n > 1 and mass >= 1 - eps - 1e-12:
        assert (kept.sum() - kept.min()) / p.sum() < 1 - eps + 1e-12
    if mass < 1 - eps - 1e-12:  # capped: it holds the k_max largest
        assert n == min(k_max, nnz)
    assert c.weights.dtype == np.int64 and c.weights.min() >= 1
    assert int(c.weights.sum()) == c.total == 2**12


@PROPERTY
@given(p=distributions(), k=st.sampled_from([1, 2, 30, 255]))
def test_topk_keeps_k_largest_and_sums_to_255(p, k):
    c = compress(p, CodecSpec("topk", k=k))
    nnz = np.count_nonzero(p)
    assert c.support.size == min(k, nnz)
    kept = p[c.support]
    rest = np.delete(p, c.support)
    assert rest.size == 0 or rest.max() <= kept.min()
    assert c.weights.dtype == np.int64 and c.weights.min() >= 0 and c.weights.max() >= 1
    assert all(c.contains(t) == (w > 0) for t, w in zip(c.support, c.weights))  # count 0: not drawable
    assert int(c.weights.sum()) == c.total == 255


@PROPERTY
@given(p=distributions(), bits=st.sampled_from([6, 8, 12, 16]))
def test_quantized_counts_are_close_to_their_share(p, bits):
    """Largest remainder: each count is the floor or the ceiling of its exact share, except that shares
    rounding to 0 are forced up to 1 and the largest counts pay for that. Payers are drained in order of
    size, so all but the last one end at 1; with 2**bits >= 4096 and n <= 64 the largest alone can pay."""
    c = compress(p, CodecSpec("adaptive", bits=bits))
    share = p[c.support] / p[c.support].sum() * c.total  # [n] the exact, real-valued counts
    assert (c.weights <= np.floor(share + 1e-9) + 1).all()
    lowered = c.weights < np.floor(share - 1e-9)  # [n] paid for forced 1s
    assert np.count_nonzero(lowered & (c.weights > 1)) <= 1
    if bits >= 12:
        assert np.count_nonzero(lowered) <= 1
        assert not lowered.any() or lowered[np.argmax(share)]


def test_ties_go_to_the_lowest_token_ids():
    uniform = np.full(1000, 1e-3)
    assert compress(uniform, CodecSpec("topk")).support.tolist() == list(range(30))
    assert compress(uniform, CodecSpec("adaptive")).support.tolist() == list(range(64))
    # A tie straddling the boundary: token 7 is larger, then ids 0.. among the equal ones.
    p = np.full(500, 1.0)
    p[7] = 5.0
    p[[3, 250]] = 0.0
    assert compress(p / p.sum(), CodecSpec("topk", k=4)).support.tolist() == [0, 1, 2, 7]
    # Equal shares round the same way every time, favouring the lower id.
    c = compress(np.full(3, 1 / 3), CodecSpec("topk"))
    assert c.weights.tolist() == [85, 85, 85]
    c = compress(np.full(7, 1 / 7), CodecSpec("adaptive", k_max=16, bits=4))
    assert c.weights.tolist() == [3, 3, 2, 2, 2, 2, 2]


def test_one_hot_and_tiny_shares():
    p = np.zeros(32000)
    p[123] = 1.0
    for name in CODEC_NAMES:
        c = compress(p, CodecSpec(name))
        assert c.support.tolist() == [123] and c.prob(123) == 1.0 and c.prob(5) == 0.0
    # topk keeps a share that rounds to 0 at count 0 (raising it to 1/255 would make junk drafts likely);
    # adaptive forces it to 1 (its top set is chosen by mass) and the largest pays for it.
    p = np.array([1 - 3e-6, 1e-6, 1e-6, 1e-6])
    c = compress(p, CodecSpec("topk"))
    assert c.weights.tolist() == [255, 0, 0, 0] and c.prob(1) == 0.0 and not c.contains(1) and c.contains(0)
    c = compress(p, CodecSpec("adaptive", eps=0.0, k_max=4, bits=2))
    assert c.weights.tolist() == [1, 1, 1, 1]


def test_large_vocab_smoke():
    rng = np.random.default_rng(3)
    z = rng.standard_normal(152_064) * 3
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    for spec in (CodecSpec("topk"), CodecSpec("adaptive")):
        c = compress(p, spec)
        expected_n = 30 if spec.name == "topk" else c.support.size
        assert sorted(c.support.tolist()) == sorted(order[:expected_n].tolist())
        assert_same(decode(encode(c, spec, p.size), spec, p.size), c)


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------


def varint_len(x: int) -> int:
    return max(1, (int(x).bit_length() + 6) // 7)


@PROPERTY
@given(p=distributions())
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_encoded_sizes_match_documented_formulas(spec, p):
    vocab = p.size
    c = compress(p, spec)
    n = c.support.size
    data = encode(c, spec, vocab)
    assert len(data) == encoded_size(n, spec, vocab, c.support)
    if spec.name == "full32":
        assert len(data) == 4 * vocab
    elif spec.name == "full16":
        assert len(data) == 2 * vocab
    elif spec.name == "topk":
        assert len(data) == 1 + 5 * n
    else:
        deltas = [int(c.support[0])] + np.diff(c.support).tolist()
        expected = varint_len(n) + sum(varint_len(d) for d in deltas) + -(-(n - 1) * spec.bits // 8)
        assert len(data) == expected


def test_adaptive_layout_by_hand():
    """n=3, ids 5, 300, 301, bits 4: varints 03 | 05 | 295 = a7 02 | 01; counts 9, 5 (last 2) -> 0x59."""
    spec = CodecSpec("adaptive", k_max=16, bits=4)
    c = Compressed(np.array([5, 300, 301]), np.array([9, 5, 2]), 16)
    data = encode(c, spec, 1000)
    assert data == bytes([0x03, 0x05, 0xA7, 0x02, 0x01, 0x59])
    assert_same(decode(data, spec, 1000), c)
    topk = Compressed(np.array([5, 300]), np.array([200, 55]), 255)
    assert encode(topk, CodecSpec("topk"), 1000) == bytes([2]) + struct.pack("<II", 5, 300) + bytes([200, 55])


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def draw_counts(c: Compressed, vocab: int, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount([c.sample(rng) for _ in range(draws)], minlength=vocab)  # [V]


@pytest.mark.parametrize("name", ["adaptive", "full32"])
def test_sample_follows_weights_over_total(name):
    rng = np.random.default_rng(11)
    vocab = 40
    p = rng.exponential(size=vocab) ** 2
    p[[0, 9, 17, 39]] = 0.0  # zeros, including the first and last token
    p /= p.sum()
    c = compress(p, CodecSpec(name, eps=0.0))
    draws = 100_000
    counts = draw_counts(c, vocab, draws, seed=12)
    assert counts[np.setdiff1d(np.arange(vocab), c.support)].sum() == 0
    expected = c.dense(vocab)[c.support] * draws
    assert chisquare(counts[c.support], expected).pvalue > 1e-3


def test_zero_weight_entries_are_never_drawn():
    for weights in (np.array([0, 3, 0, 5, 0]), np.array([0.0, 0.25, 0.0, 0.5, 0.0])):
        c = Compressed(np.array([1, 2, 3, 4, 5]), weights, weights.sum().item())
        counts = draw_counts(c, 6, 20_000, seed=5)
        assert counts.tolist()[1:] == [0, counts[2], 0, counts[4], 0] and counts[2] > 0 and counts[4] > 0
        assert not c.contains(0) and not c.contains(1) and c.contains(2) and c.prob(1) == 0.0


def test_sample_is_reproducible():
    p = np.full(100, 0.01)
    c = compress(p, CodecSpec("adaptive"))
    a = [c.sample(np.random.default_rng(4)) for _ in range(3)]
    b = [c.sample(np.random.default_rng(4)) for _ in range(3)]
    assert a == b


# ----------------------------------------------------------------------------------------------------
# Malformed payloads
# ----------------------------------------------------------------------------------------------------

V = 1000
TOPK = CodecSpec("topk", k=4)
ADAPTIVE = CodecSpec("adaptive", k_max=8, bits=12)


def topk_bytes(ids, counts, n=None) -> bytes:
    n = len(ids) if n is None else n
    return bytes([n]) + struct.pack(f"<{len(ids)}I", *ids) + bytes(counts)


def adaptive_bytes(n: int, deltas: list[bytes], stored: list[int], bits: int = 12, pad: int = 0) -> bytes:
    value = sum(c << (i * bits) for i, c in enumerate(stored)) | (pad << (len(stored) * bits))
    packed = value.to_bytes(-(-len(stored) * bits // 8), "little")
    return bytes([n]) + b"".join(deltas) + packed


def full32_bytes(values) -> bytes:
    out = np.zeros(V, dtype="<f4")
    out[: len(values)] = values
    return out.tobytes()


GOOD_TOPK = topk_bytes([3, 10], [200, 55])
GOOD_ADAPTIVE = adaptive_bytes(3, [b"\x05", b"\xa7\x02", b"\x01"], [2000, 1000])  # last = 1096

MALFORMED = [
    # (id, payload, spec, keyword the message must contain)
    ("topk-empty", b"", TOPK, "truncated"),
    ("topk-truncated", GOOD_TOPK[:-1], TOPK, "truncated"),
    ("topk-trailing", GOOD_TOPK + b"\x00", TOPK, "trailing"),
    ("topk-n-zero", b"\x00", TOPK, "n is 0"),
    ("topk-n-over-k", topk_bytes([1, 2, 3, 4, 5], [51] * 5), TOPK, "exceeds k"),
    ("topk-index-out-of-range", topk_bytes([3, V], [200, 55]), TOPK, "out of range"),
    ("topk-descending", topk_bytes([10, 3], [200, 55]), TOPK, "ascending"),
    ("topk-repeated", topk_bytes([3, 3], [200, 55]), TOPK, "ascending"),
    ("topk-bad-sum", topk_bytes([3, 10], [200, 54]), TOPK, "sum"),
    ("adaptive-empty", b"", ADAPTIVE, "truncated"),
    ("adaptive-n-zero", b"\x00", ADAPTIVE, "n is 0"),
    ("adaptive-n-over-k-max", adaptive_bytes(9, [b"\x01"] * 9, [1] * 8), ADAPTIVE, "exceeds k_max"),
    ("adaptive-truncated-varint", bytes([3, 0x05, 0xA7]), ADAPTIVE, "truncated"),
    ("adaptive-truncated-counts", GOOD_ADAPTIVE[:-1], ADAPTIVE, "truncated"),
    ("adaptive-trailing", GOOD_ADAPTIVE + b"\x00", ADAPTIVE, "trailing"),
    ("adaptive-index-out-of-range", adaptive_bytes(2, [b"\x05", b"\xe3\x07"], [2000]), ADAPTIVE,
     "out of range"),  # 5 + 995 = 1000 = V
    ("adaptive-repeated-index", adaptive_bytes(2, [b"\x05", b"\x00"], [2000]), ADAPTIVE, "ascending"),
    ("adaptive-zero-count", adaptive_bytes(3, [b"\x05", b"\x01", b"\x01"], [2000, 0]), ADAPTIVE, ">= 1"),
    ("adaptive-implied-last-zero", adaptive_bytes(3, [b"\x05", b"\x01", b"\x01"], [2000, 2096]), ADAPTIVE,
     "implied"),
    ("adaptive-implied-last-negative", adaptive_bytes(3, [b"\x05", b"\x01", b"\x01"], [4000, 200]),
     ADAPTIVE, "implied"),
    ("adaptive-non-minimal-varint", adaptive_bytes(2, [b"\x85\x00", b"\x01"], [2000]), ADAPTIVE, "minimal"),
    ("adaptive-overlong-varint", adaptive_bytes(2, [b"\x85\x80\x80\x80\x80\x01", b"\x01"], [2000]),
     ADAPTIVE, "longer than"),
    ("adaptive-padding-bits", adaptive_bytes(2, [b"\x05", b"\x01"], [2000], pad=1), ADAPTIVE, "padding"),
    # The header varint n is read on its own path (not with the index varints): the same rules apply.
    # Each of these would otherwise decode to a valid p~ (n = 1 with id 5, or GOOD_ADAPTIVE's n = 3).
    ("adaptive-non-minimal-n", b"\x81\x00\x05", ADAPTIVE, "non-minimal varint for entry count n"),
    ("adaptive-non-minimal-n-two-zeros", b"\x81\x80\x00\x05", ADAPTIVE, "non-minimal varint for entry count n"),
    ("adaptive-non-minimal-n-good-body", b"\x83\x00" + GOOD_ADAPTIVE[1:], ADAPTIVE,
     "non-minimal varint for entry count n"),
    ("adaptive-overlong-n", b"\x83\x80\x80\x80\x80\x00" + GOOD_ADAPTIVE[1:], ADAPTIVE, "longer than"),
    ("adaptive-truncated-n", b"\x83", ADAPTIVE, "truncated"),
    ("adaptive-n-over-k-max-two-bytes", b"\x80\x01" + b"\x01" * 128, ADAPTIVE, "exceeds k_max"),
    ("full32-empty", b"", CodecSpec("full32"), "truncated"),
    ("full32-truncated", full32_bytes([1.0])[:-2], CodecSpec("full32"), "truncated"),
    ("full32-trailing", full32_bytes([1.0]) + b"\x00" * 4, CodecSpec("full32"), "trailing"),
    ("full32-nan", full32_bytes([0.5, np.nan]), CodecSpec("full32"), "finite"),
    ("full32-inf", full32_bytes([0.5, np.inf]), CodecSpec("full32"), "finite"),
    ("full32-negative", full32_bytes([0.5, -0.25]), CodecSpec("full32"), "negative"),
    ("full32-negative-zero", full32_bytes([0.5, -0.0]), CodecSpec("full32"), "negative"),
    ("full32-all-zero", full32_bytes([]), CodecSpec("full32"), "all values are zero"),
    ("full16-wrong-length", b"\x00" * (4 * V), CodecSpec("full16"), "trailing"),
    ("full16-nan", np.array([np.nan] + [0.0] * (V - 1), dtype="<f2").tobytes(), CodecSpec("full16"),
     "finite"),
]


def test_hand_built_payloads_are_valid():
    assert decode(GOOD_TOPK, TOPK, V).weights.tolist() == [200, 55]
    good = decode(GOOD_ADAPTIVE, ADAPTIVE, V)
    assert good.support.tolist() == [5, 300, 301] and good.weights.tolist() == [2000, 1000, 1096]
    assert encode(good, ADAPTIVE, V) == GOOD_ADAPTIVE


@pytest.mark.parametrize("payload, spec, keyword", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_decode_rejects_malformed_payload(payload, spec, keyword):
    with pytest.raises(CodecError, match=spec.name) as info:
        decode(payload, spec, V)
    assert keyword in str(info.value), str(info.value)


def test_decode_rejects_a_payload_for_a_smaller_vocabulary():
    c = compress(np.eye(1, 50000, 40000).ravel(), CodecSpec("adaptive"))
    data = encode(c, CodecSpec("adaptive"), 50000)
    with pytest.raises(CodecError, match="out of range"):
        decode(data, CodecSpec("adaptive"), 32000)
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(compress(np.full(8, 1 / 8), CodecSpec("full32")), CodecSpec("full32"), 8),
               CodecSpec("full16"), 8)


@settings(deadline=None, max_examples=300)
@given(seed_payload=st.sampled_from([GOOD_TOPK, GOOD_ADAPTIVE]), edits=st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=4), cut=st.integers(0, 3))
def test_mutated_payloads_decode_canonically_or_raise_codec_error(seed_payload, edits, cut):
    """Any byte string either fails with CodecError (never another exception) or is canonical: encoding
    what it decodes to gives the same bytes back, so two payloads never mean the same p~."""
    spec = TOPK if seed_payload is GOOD_TOPK else ADAPTIVE
    data = bytearray(seed_payload)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
        else:
            data.append(value)
    data = bytes(data[: len(data) - cut])
    try:
        c = decode(data, spec, V)
    except CodecError:
        return
    assert encode(c, spec, V) == data


# ----------------------------------------------------------------------------------------------------
# Specs and bad inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, keyword", [
    ({"name": "zstd"}, "full32, full16, topk, adaptive"),
    ({"name": "topk", "k": 0}, "k must be"),
    ({"name": "topk", "k": 256}, "k must be <= 255"),
    ({"name": "topk", "k": 2.5}, "k must be"),
    ({"name": "adaptive", "eps": 1.0}, "eps"),
    ({"name": "adaptive", "eps": -0.1}, "eps"),
    ({"name": "adaptive", "k_max": 0}, "k_max"),
    ({"name": "adaptive", "bits": 1}, "bits"),
    ({"name": "adaptive", "bits": 25}, "bits"),
    ({"name": "adaptive", "k_max": 64, "bits": 5}, "raise bits to >= 6"),
])
def test_codec_spec_validation(kwargs, keyword):
    with pytest.raises(ValueError) as info:
        CodecSpec(**kwargs)
    assert keyword in str(info.value)


@pytest.mark.parametrize("p, keyword", [
    (np.array([0.5, np.nan]), "NaN"),
    (np.array([1.5, -0.5]), "non-negative"),
    (np.zeros(4), "positive sum"),
    (np.array([0.5, np.inf]), "positive sum"),
    (np.ones((2, 2)) / 4, "1-D"),
])
def test_compress_rejects_non_distributions(p, keyword):
    for name in CODEC_NAMES:
        with pytest.raises(ValueError, match=keyword):
            compress(p, CodecSpec(name))


def test_encode_refuses_a_compressed_of_another_codec():
    p = np.array([0.7, 0.2, 0.1])
    with pytest.raises(ValueError, match="integers"):
        encode(compress(p, CodecSpec("full32")), CodecSpec("adaptive"), 3)
    with pytest.raises(ValueError, match="sum to 4096"):
        encode(compress(p, CodecSpec("topk")), CodecSpec("adaptive"), 3)
    with pytest.raises(ValueError, match="exactly representable"):
        encode(compress(p, CodecSpec("full32")), CodecSpec("full16"), 3)
    with pytest.raises(ValueError, match="adaptive"):
        encoded_size(3, CodecSpec("adaptive"), 3)

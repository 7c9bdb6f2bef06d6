"""The payload bytes: how ``p~`` (:mod:`proto.distribution`) travels from edge to cloud, bit for bit.

Edge and cloud both import this module and nothing else for the payload, so the two sides cannot drift.
Every codec holds the invariant::

    decode(encode(compress(p), spec, V), spec, V) == compress(p, spec)

(same support, same weights, same total). :func:`decode` is also strict: it accepts exactly the byte
strings :func:`encode` can produce, so a corrupted or mismatched payload fails loudly with
:class:`CodecError` instead of being verified against the wrong distribution.

Codecs and their wire layouts (all integers little-endian, ``V`` = vocabulary size, ``n`` = support
size). The ``vocab_size`` argument of every function is ``V``: both sides pass the tokenizer's id space N
(``proto.fingerprint.id_space``), never a model's logit width, since logits are sliced to N first:

``full32``  every vocabulary entry as float32. Size ``4·V``. (HLM / U-HLM baseline.)
``full16``  every vocabulary entry as float16. Size ``2·V``.
            For both: ``p~ = f / sum(f)`` over the nonzero decoded values ``f`` (as float64).
``topk``    the ``k`` largest entries (only the nonzero ones if fewer), counts summing to exactly 255::

                uint8 n | n × uint32 index (ascending) | n × uint8 count (sum 255; 0 = not in support)

            Size ``1 + 5·n``. (CU-HLM-like baseline.)
``adaptive`` the smallest top set holding mass ``>= 1 - eps`` of ``p``, capped at ``k_max`` entries,
            counts that are ``bits``-bit integers summing to exactly ``2**bits``::

                varint n | n × varint delta index | packed counts (first n-1; the last is implied)

            Varints are unsigned LEB128 (7 bits per byte, low group first, high bit = "more follows",
            minimal length). Indices are ascending; the first varint is the first index itself, each
            following one is the (>= 1) difference to the previous index. The first ``n - 1`` counts
            are packed as a little-endian bitfield of ``bits`` bits each (count ``j`` occupies bits
            ``[j·bits, (j+1)·bits)`` of the section read as one little-endian integer; unused high bits
            of the last byte are zero); the last count is ``2**bits - sum(others)``. Size::

                len(varint(n)) + Σ_i len(varint(d_i)) + ceil((n - 1)·bits / 8)

            with ``d_0 = index_0``, ``d_i = index_i - index_{i-1}`` and ``len(varint(x)) = 1`` for
            ``x < 2**7``, ``2`` below ``2**14``, ``3`` below ``2**21``, ``4`` below ``2**28``, else 5.
"""

from __future__ import annotations

import numpy as np

from proto.distribution import FLOAT_DTYPES, MAX_VOCAB, TOPK_TOTAL, CodecSpec, Compressed, from_float_values, is_int

_MAX_VARINT_BYTES = 5  # enough for any index < 2**32 (5 × 7 = 35 bits)
# Raw bit patterns from here up are inf/NaN (exponent all ones) or carry the sign bit.
_INVALID_FLOAT_BITS = {"full32": 0x7F800000, "full16": 0x7C00}


class CodecError(ValueError):
    """A payload that :func:`decode` refuses: what is wrong, with the expected and the actual value."""


# ----------------------------------------------------------------------------------------------------
# Varints and bitfields
# ----------------------------------------------------------------------------------------------------

_VARINT_LIMITS = np.array([1 << (7 * j) for j in range(1, _MAX_VARINT_BYTES)], dtype=np.uint64)  # [4]
_VARINT_SHIFTS = 7 * np.arange(_MAX_VARINT_BYTES, dtype=np.uint64)  # [5]


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """LEB128 lengths int64 [m] of non-negative ``values`` [m] (each < 2**35)."""
    v = np.asarray(values, dtype=np.uint64)
    return 1 + (v[:, None] >= _VARINT_LIMITS).sum(axis=1)


def _varint_encode(values: np.ndarray) -> bytes:
    """Minimal unsigned LEB128 of each of ``values`` [m] (each < 2**35), concatenated."""
    v = np.asarray(values, dtype=np.uint64)  # [m]
    lengths = varint_lengths(v)  # [m]
    groups = (v[:, None] >> _VARINT_SHIFTS) & 0x7F  # [m, 5] 7-bit groups, low first
    slot = np.arange(_MAX_VARINT_BYTES)  # [5]
    more = slot < lengths[:, None] - 1  # [m, 5] continuation bit
    used = slot < lengths[:, None]  # [m, 5]
    return (groups | (more.astype(np.uint64) << 7)).astype(np.uint8)[used].tobytes()  # row-major order


def _pack_counts(counts: np.ndarray, bits: int) -> bytes:
    """``counts`` [m] (each < 2**bits) as a little-endian bitfield of ``bits`` bits each."""
    bit_planes = (counts[:, None] >> np.arange(bits)) & 1  # [m, bits] bit j of count i
    return np.packbits(bit_planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------


def _index_deltas(indices: np.ndarray) -> np.ndarray:
    """First index, then the gaps between consecutive ascending indices: int64 [n]."""
    return np.diff(np.asarray(indices, dtype=np.int64), prepend=0)


def encoded_size(n: int, spec: CodecSpec, vocab_size: int, indices: np.ndarray | None = None) -> int:
    """Bytes :func:`encode` produces for a support of ``n`` entries (formulas in the module docstring).

    ``adaptive`` needs the ascending ``indices`` [n]: its varint lengths depend on the gaps.
    """
    if spec.name == "full32":
        return 4 * vocab_size
    if spec.name == "full16":
        return 2 * vocab_size
    if spec.name == "topk":
        return 1 + 5 * n
    if indices is None or len(indices) != n:
        raise ValueError(f"adaptive: encoded_size needs the {n} ascending indices, got "
                         f"{None if indices is None else len(indices)}")
    header_and_indices = int(varint_lengths(np.concatenate([[n], _index_deltas(indices)])).sum())
    return header_and_indices + (n - 1) * spec.bits // 8 + ((n - 1) * spec.bits % 8 > 0)


def max_encoded_size(spec: CodecSpec, vocab_size: int) -> int:
    """The most bytes :func:`encode` can produce for ``spec`` over ``vocab_size`` ids (any distribution):
    what the edge checks against the verifier's message limit before it sends anything."""
    if spec.name in ("full32", "full16", "topk"):
        n = min(spec.k, vocab_size) if spec.name == "topk" else vocab_size
        return encoded_size(n, spec, vocab_size)
    n = min(spec.k_max, vocab_size)
    index_bytes = int(varint_lengths(np.array([vocab_size - 1]))[0])  # no delta exceeds the largest id
    return int(varint_lengths(np.array([n]))[0]) + n * index_bytes + ((n - 1) * spec.bits + 7) // 8


# ----------------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------------


def _check_vocab_size(vocab_size) -> None:
    if not is_int(vocab_size) or not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be an integer in [1, 2**32], got {vocab_size!r}")


def _check_integer_compressed(c: Compressed, spec: CodecSpec, vocab_size: int, cap: int, total: int) -> None:
    """ValueError unless ``c`` is something the integer codec ``spec`` can put on the wire."""
    n = c.support.size
    if not c.is_integer:
        raise ValueError(f"{spec.name}: weights must be integers, got dtype {c.weights.dtype} "
                         f"(was this compressed with another codec?)")
    if n > cap:
        raise ValueError(f"{spec.name}: support of {n} entries exceeds the cap of {cap}")
    lowest = 0 if spec.name == "topk" else 1  # topk sends shares that rounded to 0 as count 0
    if c.total != total or int(c.weights.sum()) != total or c.weights.min() < lowest:
        raise ValueError(f"{spec.name}: weights must be >= {lowest} and sum to {total}, got sum "
                         f"{int(c.weights.sum())}, total {c.total}, min {int(c.weights.min())}")
    _check_support(c, spec, vocab_size)


def _check_support(c: Compressed, spec: CodecSpec, vocab_size: int) -> None:
    if c.support[0] < 0 or c.support[-1] >= vocab_size or (np.diff(c.support) <= 0).any():
        raise ValueError(f"{spec.name}: support must be strictly ascending token ids in [0, {vocab_size})")


def _encode_float(c: Compressed, spec: CodecSpec, vocab_size: int) -> bytes:
    dtype = FLOAT_DTYPES[spec.name]
    if c.is_integer:
        raise ValueError(f"{spec.name}: weights must be floats, got dtype {c.weights.dtype}")
    _check_support(c, spec, vocab_size)
    on_wire = c.weights.astype(dtype)  # [n]
    if not np.array_equal(on_wire, c.weights):
        raise ValueError(f"{spec.name}: weights are not exactly representable in {dtype.name} "
                         f"(was this Compressed made by compress(p, {spec.name!r})?)")
    values = np.zeros(vocab_size, dtype=dtype)  # [V]
    values[c.support] = on_wire
    return values.tobytes()


def _encode_topk(c: Compressed, spec: CodecSpec, vocab_size: int) -> bytes:
    _check_integer_compressed(c, spec, vocab_size, spec.k, TOPK_TOTAL)
    n = c.support.size
    return (bytes([n]) + c.support.astype("<u4").tobytes() + c.weights.astype(np.uint8).tobytes())


def _encode_adaptive(c: Compressed, spec: CodecSpec, vocab_size: int) -> bytes:
    _check_integer_compressed(c, spec, vocab_size, spec.k_max, 2**spec.bits)
    n = c.support.size
    header_and_indices = _varint_encode(np.concatenate([[n], _index_deltas(c.support)]))
    return header_and_indices + _pack_counts(c.weights[:-1], spec.bits)  # the last count is implied


def encode(c: Compressed, spec: CodecSpec, vocab_size: int) -> bytes:
    """The payload bytes of ``c`` (normally ``compress(p, spec)``); ValueError if ``spec`` cannot carry it."""
    _check_vocab_size(vocab_size)
    if spec.is_float:
        return _encode_float(c, spec, vocab_size)
    if spec.name == "topk":
        return _encode_topk(c, spec, vocab_size)
    return _encode_adaptive(c, spec, vocab_size)


# ----------------------------------------------------------------------------------------------------
# decode: strict, every violation is a CodecError naming what was expected
# ----------------------------------------------------------------------------------------------------


def _fail(spec: CodecSpec, message: str) -> CodecError:
    return CodecError(f"{spec.name} payload: {message}")


def _check_length(data: bytes, expected: int, spec: CodecSpec, what: str) -> None:
    if len(data) < expected:
        raise _fail(spec, f"truncated: {what} needs {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise _fail(spec, f"{len(data) - expected} trailing bytes: {what} needs {expected} bytes, "
                          f"got {len(data)}")


def _check_indices(indices: np.ndarray, spec: CodecSpec, vocab_size: int) -> None:
    """``indices`` int64 [n] must be strictly ascending and in [0, V)."""
    if indices[-1] >= vocab_size:
        bad = int(indices[indices >= vocab_size][0])
        raise _fail(spec, f"token id {bad} out of range: must be < vocab_size {vocab_size}")
    steps = np.diff(indices)  # [n-1]
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise _fail(spec, f"token ids not strictly ascending: entry {i + 1} is {int(indices[i + 1])} "
                          f"after {int(indices[i])}")


def _check_counts(counts: np.ndarray, total: int, spec: CodecSpec, allow_zero: bool = False) -> None:
    if not allow_zero and counts.min() < 1:
        i = int(np.flatnonzero(counts < 1)[0])
        raise _fail(spec, f"count {i} is {int(counts[i])}; every count must be >= 1")
    if int(counts.sum()) != total:
        raise _fail(spec, f"counts sum to {int(counts.sum())}, expected exactly {total}")


# How far a float payload's sum may sit from 1: rounding p to the dtype moves each entry by at most one
# unit in the last place, and float16 flushes entries below ~3e-8 to 0 (at most ~5e-3 of mass at a
# 152k vocabulary). Anything further off was not a normalized distribution on the edge.
_FLOAT_SUM_TOLERANCE = {"full32": 1e-4, "full16": 1e-2}


def _decode_float(data: bytes, spec: CodecSpec, vocab_size: int) -> Compressed:
    dtype = FLOAT_DTYPES[spec.name]
    _check_length(data, dtype.itemsize * vocab_size, spec, f"{vocab_size} × {dtype.name}")
    values = np.frombuffer(data, dtype=dtype)  # [V]
    # One pass over the raw bits: a value is a valid probability iff its sign bit is clear (-0.0 is
    # refused too, so every accepted payload is canonical) and its exponent is not all ones (inf/NaN).
    raw = values.view(f"<u{dtype.itemsize}")  # [V]
    first_invalid = _INVALID_FLOAT_BITS[spec.name]
    if (raw >= first_invalid).any():
        i = int(np.flatnonzero(raw >= first_invalid)[0])
        if not np.isfinite(values[i]):
            raise _fail(spec, f"value at token {i} is {values[i]}; probabilities must be finite (no NaN/inf)")
        raise _fail(spec, f"value at token {i} is negative ({values[i]}); probabilities must be >= 0")
    c = from_float_values(values)
    if c is None:
        raise _fail(spec, "all values are zero; expected a positive sum")
    if abs(c.total - 1.0) > _FLOAT_SUM_TOLERANCE[spec.name]:
        raise _fail(spec, f"values sum to {c.total:.6g}; probabilities must sum to 1 "
                    f"(within {_FLOAT_SUM_TOLERANCE[spec.name]:g})")
    return c


def _decode_topk(data: bytes, spec: CodecSpec, vocab_size: int) -> Compressed:
    if len(data) == 0:
        raise _fail(spec, "truncated: empty payload, expected at least the 1-byte entry count n")
    n = data[0]
    if n == 0:
        raise _fail(spec, "entry count n is 0; expected 1..k")
    if n > spec.k:
        raise _fail(spec, f"entry count n = {n} exceeds k = {spec.k}")
    _check_length(data, 1 + 5 * n, spec, f"n = {n} entries (1 + 5·n)")
    indices = np.frombuffer(data, dtype="<u4", count=n, offset=1).astype(np.int64)  # [n]
    counts = np.frombuffer(data, dtype=np.uint8, count=n, offset=1 + 4 * n).astype(np.int64)  # [n]
    _check_indices(indices, spec, vocab_size)
    _check_counts(counts, TOPK_TOTAL, spec, allow_zero=True)  # 8-bit shares of tiny entries round to 0
    return Compressed(indices, counts, TOPK_TOTAL)


def _read_varint(data: bytes, pos: int, spec: CodecSpec, what: str) -> tuple[int, int]:
    """(value, position after it) of the minimal LEB128 varint at ``data[pos:]``."""
    value = 0
    for j in range(_MAX_VARINT_BYTES):
        if pos + j >= len(data):
            raise _fail(spec, f"truncated: {what} varint runs past the end of the {len(data)}-byte payload")
        byte = data[pos + j]
        value |= (byte & 0x7F) << (7 * j)
        if byte < 0x80:
            if byte == 0 and j > 0:
                raise _fail(spec, f"non-minimal varint for {what} (ends in a zero byte)")
            return value, pos + j + 1
    raise _fail(spec, f"{what} varint longer than {_MAX_VARINT_BYTES} bytes")


def _read_varints(body: np.ndarray, n: int, spec: CodecSpec) -> tuple[np.ndarray, int]:
    """The first ``n`` varints of ``body`` (uint8 [m]) as int64 [n], and the bytes they take.

    Vectorized: a varint ends at each byte < 0x80; the n-th such byte ends the index section.
    """
    ends = np.flatnonzero(body < 0x80)  # [*] last byte of each varint
    if ends.size < n:
        raise _fail(spec, f"truncated: expected {n} index varints, found {ends.size} complete ones")
    ends = ends[:n]  # [n]
    starts = np.concatenate([[0], ends[:-1] + 1])  # [n]
    lengths = ends - starts + 1  # [n]
    if lengths.max() > _MAX_VARINT_BYTES:
        raise _fail(spec, f"index varint longer than {_MAX_VARINT_BYTES} bytes")
    if ((lengths > 1) & (body[ends] == 0)).any():
        raise _fail(spec, "non-minimal index varint (ends in a zero byte)")
    size = int(ends[-1]) + 1
    offset_in_varint = np.arange(size) - np.repeat(starts, lengths)  # [size]
    groups = (body[:size] & 0x7F).astype(np.int64) << (7 * offset_in_varint)  # [size]
    return np.add.reduceat(groups, starts), size  # disjoint bit groups: sum == or


def _unpack_counts(raw: np.ndarray, m: int, bits: int, spec: CodecSpec) -> np.ndarray:
    """``m`` counts int64 [m] from the little-endian bitfield ``raw`` (uint8); padding bits must be 0."""
    bit_stream = np.unpackbits(raw, bitorder="little")  # [8·len(raw)]
    if bit_stream[m * bits:].any():
        raise _fail(spec, "nonzero padding bits after the last packed count")
    planes = bit_stream[: m * bits].reshape(m, bits).astype(np.int64)  # [m, bits]
    return planes @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def _decode_adaptive(data: bytes, spec: CodecSpec, vocab_size: int) -> Compressed:
    n, pos = _read_varint(data, 0, spec, "entry count n")
    if n == 0:
        raise _fail(spec, "entry count n is 0; expected 1..k_max")
    if n > spec.k_max:
        raise _fail(spec, f"entry count n = {n} exceeds k_max = {spec.k_max}")
    body = np.frombuffer(data, dtype=np.uint8, offset=pos)  # [len - pos]
    deltas, index_bytes = _read_varints(body, n, spec)  # [n]
    if (deltas[1:] == 0).any():
        i = int(np.flatnonzero(deltas[1:] == 0)[0]) + 1
        raise _fail(spec, f"token ids not strictly ascending: delta {i} is 0 (repeated id)")
    indices = np.cumsum(deltas)  # [n]
    _check_indices(indices, spec, vocab_size)
    packed_size = ((n - 1) * spec.bits + 7) // 8
    _check_length(data, pos + index_bytes + packed_size, spec,
                  f"n = {n} entries ({pos + index_bytes} header/index bytes + {packed_size} count bytes)")
    total = 2**spec.bits
    stored = _unpack_counts(body[index_bytes:], n - 1, spec.bits, spec)  # [n-1]
    if stored.size and stored.min() < 1:
        i = int(np.flatnonzero(stored < 1)[0])
        raise _fail(spec, f"count {i} is 0; every count must be >= 1")
    last = total - int(stored.sum())
    if last < 1:
        raise _fail(spec, f"implied last count is {last} (stored counts sum to {int(stored.sum())} of "
                          f"{total}); it must be >= 1")
    return Compressed(indices, np.append(stored, last), total)


def decode(data: bytes, spec: CodecSpec, vocab_size: int) -> Compressed:
    """``p~`` from payload bytes; CodecError unless ``data`` is exactly what :func:`encode` could produce."""
    _check_vocab_size(vocab_size)
    data = bytes(data)
    if spec.is_float:
        return _decode_float(data, spec, vocab_size)
    if spec.name == "topk":
        return _decode_topk(data, spec, vocab_size)
    return _decode_adaptive(data, spec, vocab_size)

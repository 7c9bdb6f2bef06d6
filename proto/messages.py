"""Conversions between wire messages and the settings objects both sides compute with.

One place for the rule, so edge and cloud read Sampling, Codec and Fingerprint fields identically, and write
and read ``Opened.conditioning`` (the LLM's prompt states) identically.
"""

from __future__ import annotations

import numpy as np

from core.sampling import SamplingSettings
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec

FRAME_OVERHEAD = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes, per message
# Open.protocol: 2 = positions, epochs and blocks in Verify (pipelined drafting); 0 = a version-1 client.
PROTOCOL_VERSION = 2


def sampling_to_msg(s: SamplingSettings) -> pb.Sampling:
    return pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def sampling_from_msg(m: pb.Sampling) -> SamplingSettings:
    """Raises ValueError (from SamplingSettings) on out-of-range values; top_p 0 means off."""
    return SamplingSettings(temperature=float(m.temperature), top_k=int(m.top_k),
                            top_p=float(m.top_p) if m.top_p else 1.0)


def codec_to_msg(c: CodecSpec) -> pb.Codec:
    return pb.Codec(name=c.name, k=c.k, eps=c.eps, k_max=c.k_max, bits=c.bits)


# The Codec fields each codec reads; proto3 sends 0 for the others, which must not be validated for it.
CODEC_PARAMETERS = {"full32": (), "full16": (), "topk": ("k",), "adaptive": ("eps", "k_max", "bits")}


def codec_from_msg(m: pb.Codec) -> CodecSpec:
    """Raises ValueError (from CodecSpec) on unknown names or out-of-range parameters. Only the parameters
    the named codec uses are taken from the message (an Open with just ``name = "full32"`` is valid)."""
    used = CODEC_PARAMETERS.get(m.name, ("k", "eps", "k_max", "bits"))
    return CodecSpec(name=m.name, **{field: getattr(m, field) for field in used})


def fingerprint_to_msg(fp: dict) -> pb.Fingerprint:
    """The wire form of a fingerprint dict (``tokenizer_hash``, ``id_space``, ``logit_width``).

    Field 1 (``vocab_size``, deprecated) repeats the logit width: what it meant before id-space pairing.
    """
    return pb.Fingerprint(vocab_size=fp["logit_width"], tokenizer_hash=fp["tokenizer_hash"], id_space=fp["id_space"],
                          logit_width=fp["logit_width"])


def fingerprint_from_msg(m: pb.Fingerprint) -> dict:
    """The dict form; ``id_space`` is None when the sender predates id-space pairing (field 3 unset, i.e. 0).

    A sender that predates ``logit_width`` put its logit width in ``vocab_size``.
    """
    return {"tokenizer_hash": m.tokenizer_hash, "id_space": m.id_space or None,
            "logit_width": m.logit_width or m.vocab_size or None}


def wire_size(msg) -> int:
    """Bytes a message occupies in the gRPC stream: serialized size plus the 5-byte length prefix."""
    return msg.ByteSize() + FRAME_OVERHEAD


# Opened.conditioning: float16, little-endian, row-major [prompt_len, conditioning_dim].
CONDITIONING_DTYPE = np.dtype("<f2")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def conditioning_to_bytes(states: np.ndarray) -> bytes:
    """``states`` [prompt_len, dim] as Opened.conditioning. Values past the float16 range (a large model's outlier
    activations can be) are clamped to it: a saturated feature stays large instead of becoming inf."""
    return np.clip(states, -_FLOAT16_MAX, _FLOAT16_MAX).astype(CONDITIONING_DTYPE).tobytes()


def conditioning_bytes(rows: int, dim: int) -> int:
    """Bytes of Opened.conditioning for ``rows`` prompt positions of width ``dim``."""
    return rows * dim * CONDITIONING_DTYPE.itemsize


def conditioning_from_msg(m: pb.Opened) -> np.ndarray:
    """The [prompt_len, conditioning_dim] float32 array an Opened carries; ValueError when it carries none or its
    length is not a whole number of rows."""
    dim, data = int(m.conditioning_dim), m.conditioning
    if not dim or not data:
        raise ValueError("Opened carries no conditioning")
    row = conditioning_bytes(1, dim)
    if len(data) % row:
        raise ValueError(f"Opened.conditioning holds {len(data):,} bytes, not a whole number of {dim}-wide float16 rows")
    return np.frombuffer(data, dtype=CONDITIONING_DTYPE).reshape(-1, dim).astype(np.float32)

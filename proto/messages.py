"""Conversions between wire messages and the settings objects both sides compute with.

One place for the rule, so edge and cloud read Sampling and Codec fields identically.
"""

from __future__ import annotations

from core.sampling import SamplingSettings
from proto import hybrid_pb2 as pb
from proto.distribution import CodecSpec

FRAME_OVERHEAD = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes, per message


def sampling_to_msg(s: SamplingSettings) -> pb.Sampling:
    return pb.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def sampling_from_msg(m: pb.Sampling) -> SamplingSettings:
    """Raises ValueError (from SamplingSettings) on out-of-range values; top_p 0 means off."""
    return SamplingSettings(temperature=float(m.temperature), top_k=int(m.top_k),
                            top_p=float(m.top_p) if m.top_p else 1.0)


def codec_to_msg(c: CodecSpec) -> pb.Codec:
    return pb.Codec(name=c.name, k=c.k, eps=c.eps, k_max=c.k_max, bits=c.bits)


def codec_from_msg(m: pb.Codec) -> CodecSpec:
    """Raises ValueError (from CodecSpec) on unknown names or out-of-range parameters."""
    return CodecSpec(name=m.name, k=m.k, eps=m.eps, k_max=m.k_max, bits=m.bits)


def wire_size(msg) -> int:
    """Bytes a message occupies in the gRPC stream: serialized size plus the 5-byte length prefix."""
    return msg.ByteSize() + FRAME_OVERHEAD

"""Bytes a gRPC message really occupies on a link: the trace's sizes plus HTTP/2, TCP/IP and link headers.

The trace records ``wire_size`` = protobuf ByteSize + the 5-byte gRPC length prefix (``proto/messages.py``).
On the link each message additionally pays, per the defaults below:

- HTTP/2: a 9-byte DATA frame header per frame of at most 16,384 payload bytes (SETTINGS_MAX_FRAME_SIZE
  default, which grpc keeps);
- TCP/IP: per segment 20 B IPv4 + 20 B TCP + 12 B timestamp option = 52 B, segments of at most
  MSS = 1,448 payload bytes (1,500-byte MTU - 52); grpc sets TCP_NODELAY, so a small message is one
  segment of its own;
- link layer: 14 B Ethernet header per packet (what Linux ``tbf`` counts on a veth; preamble, FCS and
  inter-frame gap are not seen by the qdisc and are left out; set ``l2_bytes`` for another link);
- once per RPC: the HEADERS frame of the call (HPACK-encoded ``:path``, ``content-type``, ``te``,
  ``user-agent``, ...; ~120 B up) and the response HEADERS + trailers (~100 B down), carried with the
  first message in each direction.

Not modelled (each is small next to the payload and travels on the reverse direction concurrently): TCP
ACKs, HTTP/2 WINDOW_UPDATE and PING frames, the connection preface and SETTINGS exchange (once per
connection, not per generation).
"""

from __future__ import annotations

from dataclasses import dataclass

HTTP2_FRAME_HEADER = 9
HTTP2_MAX_FRAME = 16384


@dataclass(frozen=True)
class Framing:
    mss: int = 1448  # TCP payload bytes per segment
    tcpip_bytes: int = 52  # IPv4 20 + TCP 20 + timestamps 12, per segment
    l2_bytes: int = 14  # link-layer header per packet
    headers_up: int = 120  # the RPC's request HEADERS frame, with the first uplink message
    headers_down: int = 100  # response HEADERS + trailers, with the first downlink message

    def wire(self, grpc_bytes: int, first_of_call: bool = False, up: bool = True) -> int:
        """Link bytes of one gRPC message of ``grpc_bytes`` (its trace size); 0 stays 0 (nothing sent)."""
        if grpc_bytes <= 0:
            return 0
        frames = -(-grpc_bytes // HTTP2_MAX_FRAME)
        payload = grpc_bytes + HTTP2_FRAME_HEADER * frames
        if first_of_call:
            payload += HTTP2_FRAME_HEADER + (self.headers_up if up else self.headers_down)
        segments = -(-payload // self.mss)
        return payload + segments * (self.tcpip_bytes + self.l2_bytes)

    def segments(self, wire_bytes: int) -> int:
        """Packets a message of ``wire_bytes`` link bytes was cut into (for the loss model)."""
        return -(-wire_bytes // (self.mss + self.tcpip_bytes + self.l2_bytes))

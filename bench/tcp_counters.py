"""What a TCP exchange costs on the wire, as the kernel counts it on the socket, never estimated from
message sizes (benchmark 3).

`Counters` are one socket's counters (`TCP_INFO`: bytes sent and received, segments in and out, pure
ACKs included); `WireCost` the difference of two readings per exchange, in three ways: the
application's bytes, IP (plus 20 bytes of IPv4 and 20 + 12 of TCP with timestamps per segment, as Linux
sends them), and Ethernet (plus 38 bytes per frame: header, FCS, preamble and inter-frame gap).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

ETHERNET_FRAME_OVERHEAD = 14 + 4 + 8 + 12  # header, FCS, preamble + start delimiter, inter-frame gap
_TCPI_OPT_TIMESTAMPS = 1


@dataclass(frozen=True)
class Counters:
    """The kernel's counters of one TCP socket (struct tcp_info, Linux ≥ 4.19)."""

    bytes_sent: int
    bytes_received: int
    segs_out: int
    segs_in: int
    timestamps: bool

    @classmethod
    def of(cls, sock: Any) -> Counters:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        options = info[5]
        (bytes_received,) = struct.unpack_from("Q", info, 128)
        segs_out, segs_in = struct.unpack_from("II", info, 136)
        (bytes_sent,) = struct.unpack_from("Q", info, 200)
        return cls(bytes_sent, bytes_received, segs_out, segs_in, bool(options & _TCPI_OPT_TIMESTAMPS))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.bytes_sent - other.bytes_sent,
            self.bytes_received - other.bytes_received,
            self.segs_out - other.segs_out,
            self.segs_in - other.segs_in,
            self.timestamps,
        )


@dataclass(frozen=True)
class WireCost:
    """Bytes of one exchange (averaged over `samples`), from the agent's side."""

    samples: int
    app_bytes_out: float
    app_bytes_in: float
    segments_out: float
    segments_in: float
    app_bytes: float
    ip_bytes: float
    ethernet_bytes: float

    @classmethod
    def of(cls, delta: Counters, samples: int) -> WireCost:
        header = 20 + 20 + (12 if delta.timestamps else 0)
        segments = delta.segs_out + delta.segs_in
        app = delta.bytes_sent + delta.bytes_received
        return cls(
            samples=samples,
            app_bytes_out=round(delta.bytes_sent / samples, 1),
            app_bytes_in=round(delta.bytes_received / samples, 1),
            segments_out=round(delta.segs_out / samples, 2),
            segments_in=round(delta.segs_in / samples, 2),
            app_bytes=round(app / samples, 1),
            ip_bytes=round((app + segments * header) / samples, 1),
            ethernet_bytes=round((app + segments * (header + ETHERNET_FRAME_OVERHEAD)) / samples, 1),
        )

"""What a TCP exchange costs on the wire, as the kernel counts it on the socket, never estimated from
message sizes (benchmark 3).

`Counters` are one socket's counters (`TCP_INFO`: bytes sent and received, segments in and out, pure
ACKs included, and what of it was sent again); `WireCost` the difference of two readings per exchange,
in three ways: the application's bytes, IP (plus 20 bytes of IPv4 and 20 + 12 of TCP with timestamps
per segment, as Linux sends them), and Ethernet (plus 38 bytes per frame: header, FCS, preamble and
inter-frame gap).
Retransmissions (a loaded machine's loopback has a few: a tail-loss probe re-sends the last segment)
are left out of the exchange's cost and counted apart: they are the network's, not the protocol's.
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
    retrans_bytes: int = 0
    retrans_segs: int = 0

    @classmethod
    def of(cls, sock: Any) -> Counters:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        options = info[5]
        (bytes_received,) = struct.unpack_from("Q", info, 128)
        segs_out, segs_in = struct.unpack_from("II", info, 136)
        (bytes_sent, bytes_retrans) = struct.unpack_from("QQ", info, 200)
        (total_retrans,) = struct.unpack_from("I", info, 100)
        timestamps = bool(options & _TCPI_OPT_TIMESTAMPS)
        return cls(bytes_sent, bytes_received, segs_out, segs_in, timestamps, bytes_retrans, total_retrans)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.bytes_sent - other.bytes_sent,
            self.bytes_received - other.bytes_received,
            self.segs_out - other.segs_out,
            self.segs_in - other.segs_in,
            self.timestamps,
            self.retrans_bytes - other.retrans_bytes,
            self.retrans_segs - other.retrans_segs,
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
    retransmitted_bytes: float = 0.0
    """Sent again (left out of the figures above)."""

    @classmethod
    def of(cls, delta: Counters, samples: int) -> WireCost:
        header = 20 + 20 + (12 if delta.timestamps else 0)
        sent, segs_out = delta.bytes_sent - delta.retrans_bytes, delta.segs_out - delta.retrans_segs
        segments = segs_out + delta.segs_in
        app = sent + delta.bytes_received
        return cls(
            samples=samples,
            app_bytes_out=round(sent / samples, 1),
            app_bytes_in=round(delta.bytes_received / samples, 1),
            segments_out=round(segs_out / samples, 2),
            segments_in=round(delta.segs_in / samples, 2),
            app_bytes=round(app / samples, 1),
            ip_bytes=round((app + segments * header) / samples, 1),
            ethernet_bytes=round((app + segments * (header + ETHERNET_FRAME_OVERHEAD)) / samples, 1),
            retransmitted_bytes=round(delta.retrans_bytes / samples, 1),
        )

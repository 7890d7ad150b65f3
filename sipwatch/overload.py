"""When to shed load: from the bytes waiting in the proxy's receive queues.

Past its capacity a UDP proxy does not slow down gracefully: datagrams queue in the socket
buffer, every message waits longer, SIPp and real UACs retransmit (Timer A, 500 ms), which adds
load, and goodput collapses. The queue is the earliest honest signal: while it stays short the
proxy keeps up, whatever its CPU shows. So the edge samples the kernel's count of bytes held in
each receive queue (``SO_MEMINFO``, Linux) a few dozen times a second, and the core answers new
dialogs ``503`` + ``Retry-After`` while the queue is above the high-water mark, until it falls
below the low-water mark (hysteresis, so a burst does not flap it). Short bursts are absorbed by
the buffer: shedding starts only when the queue says the proxy has not kept up for a while. In-dialog requests and all
responses keep flowing: they belong to calls already admitted.

Pure logic here (:class:`OverloadGuard`); the sampling of sockets is :func:`queued_bytes`.
"""
from __future__ import annotations

import socket
import struct

# Linux <linux/socket.h>: SO_MEMINFO = 55, an array of u32; index 0 is SK_MEMINFO_RMEM_ALLOC
# (bytes charged to the receive queue, skb overhead included), index 8 SK_MEMINFO_DROPS.
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO_LEN = 9 * 4
# Bytes, skb overhead included (about 2.3 KB per 700-byte datagram on Linux loopback). The edge
# uses 3/8 of the receive buffer the kernel granted, at most this: with a 8 MB buffer about 1700
# queued datagrams, some 60-80 ms of work, well inside the 500 ms after which UACs retransmit.
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20


def queued_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue, or -1 where the kernel cannot tell."""
    try:
        return struct.unpack_from("I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO_LEN))[0]
    except (OSError, struct.error):
        return -1


class OverloadGuard:
    """Hysteresis over queue samples: overloaded once the queue stayed above ``high`` for
    ``window`` samples in a row (a standing queue, as CoDel reads it, not a burst that drains on
    its own), back to normal as soon as one sample is below ``low``."""

    def __init__(self, high: int = HIGH_WATER, low: int = LOW_WATER, window: int = 1):
        if not 0 <= low < high or window < 1:
            raise ValueError("need 0 <= low < high and window >= 1")
        self.high = high
        self.low = low
        self.window = window
        self.overloaded = False
        self.episodes = 0  # times it went into overload
        self._above = 0  # consecutive samples above high

    def update(self, queued: int) -> bool:
        if queued < 0:
            return self.overloaded  # no measurement: keep the last decision
        self._above = self._above + 1 if queued > self.high else 0
        if self.overloaded:
            if queued < self.low:
                self.overloaded = False
        elif self._above >= self.window:
            self.overloaded = True
            self.episodes += 1
        return self.overloaded

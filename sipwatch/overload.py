"""When to shed load: from the bytes waiting in the proxy's receive queues.

Past its capacity a UDP proxy does not slow down gracefully: datagrams queue in the socket
buffer, every message waits longer, SIPp and real UACs retransmit (Timer A, 500 ms), which adds
load, and goodput collapses. The queue is the earliest honest signal: while it stays short the
proxy keeps up, whatever its CPU shows. So the edge samples the kernel's count of bytes held in
each receive queue (``SO_MEMINFO``, Linux) a few dozen times a second, and the core answers new
dialogs ``503`` + ``Retry-After`` while the queue is above the high-water mark, until it falls
below the low-water mark (hysteresis, so a burst does not flap it). Short bursts are absorbed by
the buffer: shedding starts only when the queue says the proxy has not kept up for a while, or
at once when the buffer is close to full. In-dialog requests and all responses keep flowing:
they belong to calls already admitted.

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
    its own), or at once when a sample is above ``urgent`` (the buffer is about to overflow: the
    kernel would then drop datagrams of every call alike); back to normal as soon as one sample
    is below ``low``.

    Why ``urgent``: offered twice its capacity, the queue grows by ~100 MB/s (7 messages a call,
    ~2.3 KB each as the kernel counts them); a 50-ms window then overflows an 8-MB buffer before
    it ends, in every cycle of admitting and shedding. The drops made SIPp retransmit and admitted
    calls fail, and goodput fell to 56-90% of capacity from run to run."""

    def __init__(self, high: int = HIGH_WATER, low: int = LOW_WATER, window: int = 1, urgent: int | None = None):
        if not 0 <= low < high or window < 1 or (urgent is not None and urgent <= high):
            raise ValueError("need 0 <= low < high < urgent and window >= 1")
        self.high = high
        self.low = low
        self.window = window
        self.urgent = urgent
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
        elif self._above >= self.window or (self.urgent is not None and queued > self.urgent):
            self.overloaded = True
            self.episodes += 1
        return self.overloaded

"""The UDP edge: asyncio datagram protocols that feed the sans-IO core and send its output.

Thin on purpose: one ``receive_datagram`` call and a ``sendto`` per output. Send failures
(an ICMP port unreachable from a dead upstream arrives as ``error_received``) are counted, never
raised. Next hops are IP literals: the core resolves no names.
"""
from __future__ import annotations

import asyncio
import socket
import time

from .core import ProxyCore
from .overload import HIGH_WATER, OverloadGuard, queued_bytes

OVERLOAD_SAMPLE = 0.01  # seconds between receive-queue samples (about 2 µs each)
OVERLOAD_WINDOW = 5  # samples in a row above the high-water mark before shedding (>= 50 ms)



def epoch_clock():
    """time.time()-based seconds that never step: monotonic plus the offset at start."""
    offset = time.time() - time.monotonic()
    mono = time.monotonic
    return lambda: mono() + offset


class UdpEdge:
    """Feeds datagrams from both sockets to the core and routes its output.

    Two UDP sockets share the listen address (SO_REUSEPORT): one unconnected, for the gateway
    side, and one *connected* to the upstream. The kernel hands the upstream's datagrams to the
    connected socket, and only a connected socket reports ICMP port-unreachable (a dead
    sip-signaling) back as an error, which is counted. Without SO_REUSEPORT one socket does both.

    The core only ever returns IP literals (it resolves no names), so sending is one ``sendto``.
    Nothing raises out of :meth:`handle`: whatever the core or the socket throws is counted.
    """

    def __init__(self, core: ProxyCore, clock):
        self.core = core
        self._receive = core.receive_datagram  # bound once: called for every datagram
        self.stats = core.stats
        self.clock = clock
        self.upstream = core.upstream
        self.listen_tx: asyncio.DatagramTransport | None = None
        self.upstream_tx: asyncio.DatagramTransport | None = None
        self.last_error: str | None = None
        self._socks: list[socket.socket] = []
        self.guard: OverloadGuard | None = None
        self.overload_window = OVERLOAD_WINDOW  # samples above the mark before shedding (--overload-after)
        self._watch: asyncio.TimerHandle | None = None
        # wiretap(payload, src, dst, ts), if set, sees every datagram received and every one
        # sent (None for this proxy's own address); it must only queue (the HEP sender)
        self.wiretap = None
        # the TCP edge (sipwatch.tcp), for outputs the core sends over TCP (core.out_tcp)
        self.tcp = None

    def handle(self, data: bytes, addr) -> None:
        # IPv4 source addresses already are (host, port); IPv6 ones carry flowinfo/scope too
        src = addr if type(addr) is tuple and len(addr) == 2 else (addr[0], addr[1])
        now = self.clock()
        out = self._receive(data, src, now)
        if self.core.out_tcp:
            self._to_tcp(data, src, now, out)
            return
        tap = self.wiretap
        if tap is not None:
            tap(data, src, None, now)
            for payload, dest in out:
                tap(payload, None, dest, now)
        for payload, dest in out:
            try:
                if dest == self.upstream:
                    utx = self.upstream_tx
                    if utx is not None:
                        utx.sendto(payload)
                        continue
                self.listen_tx.sendto(payload, dest)
            except OSError as exc:
                self.send_failed(exc)
            except Exception as exc:  # e.g. an address family the socket cannot reach
                self.stats.internal_errors["send"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def _to_tcp(self, data: bytes, src, now: float, out) -> None:
        """The core's output for this datagram leaves over TCP (a large request toward the
        upstream, a request toward a gateway that uses TCP)."""
        self.core.out_tcp = False
        tap = self.wiretap
        if tap is not None:
            tap(data, src, None, now)
            for payload, dest in out:
                tap(payload, None, dest, now, "tcp")
        tcp = self.tcp
        if tcp is not None:
            tcp.now = now
        for payload, dest in out:
            if tcp is not None:
                tcp.send(payload, dest)
            else:
                self.stats.send_errors += 1

    def send(self, payload: bytes, dest) -> None:
        """One datagram to ``dest`` (for the TCP edge's outputs that go over UDP). Never raises."""
        try:
            if dest == self.upstream and self.upstream_tx is not None:
                self.upstream_tx.sendto(payload)
            else:
                self.listen_tx.sendto(payload, dest)
        except OSError as exc:
            self.send_failed(exc)
        except Exception as exc:  # noqa: BLE001
            self.stats.internal_errors["send"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def send_failed(self, exc: Exception) -> None:
        self.stats.send_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for t in (self.listen_tx, self.upstream_tx):
            if t is not None:
                t.close()

    # -- overload ------------------------------------------------------------------------
    def watch_overload(self, guard: OverloadGuard | None = None) -> None:
        """Sample the receive queues every OVERLOAD_SAMPLE s and tell the core when to shed.
        Thresholds follow the buffer the kernel really granted (net.core.rmem_max caps it)."""
        if guard is None:
            rcvbuf = min(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in self._socks)
            high = min(HIGH_WATER, rcvbuf * 3 // 8)
            guard = OverloadGuard(high, high // 2, self.overload_window)
        self.guard = guard
        self._sample()

    def _sample(self) -> None:
        try:
            queued = 0
            for s in self._socks:
                n = queued_bytes(s)
                if n < 0:
                    return  # no SO_MEMINFO here: never shed (and stop sampling)
                queued += n
            self.core.overloaded = self.stats.overloaded = self.guard.update(queued)
        except Exception as exc:  # never let the watchdog take the loop down
            self.stats.internal_errors["tick"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self._watch = asyncio.get_running_loop().call_later(OVERLOAD_SAMPLE, self._sample)

    async def open(self, listen: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        reuse = hasattr(socket, "SO_REUSEPORT")
        lsock = _udp_socket(family, reuse)
        lsock.bind((host, port))
        self._socks.append(lsock)
        self.listen_tx, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=lsock)
        if reuse:
            usock = _udp_socket(family, True)
            try:
                usock.bind(lsock.getsockname()[:2])
                usock.connect(self.upstream)
            except OSError:
                usock.close()
            else:
                self._socks.append(usock)
                self.upstream_tx, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=usock)
        self.watch_overload()


def _udp_socket(family: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)  # absorb bursts
        except OSError:
            pass
    sock.setblocking(False)
    return sock


class _Protocol(asyncio.DatagramProtocol):
    """The loop calls ``datagram_received`` per datagram: it is the edge's bound ``handle``
    itself (an instance slot over the base class's method), so no Python frame of ours sits
    between the loop and the edge."""
    __slots__ = ("edge", "datagram_received")

    def __init__(self, edge: UdpEdge):
        self.edge = edge
        self.datagram_received = edge.handle  # type: ignore[method-assign]

    def error_received(self, exc: Exception) -> None:
        self.edge.send_failed(exc)

"""The UDP edge: reads datagrams from the two sockets, feeds the sans-IO core and sends its output.

Thin on purpose: one ``receive_datagram`` call and a send per output. Send failures (an ICMP port
unreachable from a dead upstream arrives as an error on the connected socket) are counted, never
raised. Next hops are IP literals: the core resolves no names.

Two readers, one behaviour: the C pump (``sipwatch/_udppump.c``, when it is built and
``SIPWATCH_NO_C`` is not ``1``) reads the sockets from ``loop.add_reader`` and sends the common
output itself; without it, uvloop's datagram transports call :meth:`UdpEdge.handle`. Both hand
everything else to :meth:`UdpEdge.dispatch`.
"""
from __future__ import annotations

import asyncio
import errno
import select
import socket
import time

from . import optional_c
from .core import ProxyCore
from .overload import HIGH_WATER, OverloadGuard, queued_bytes

OVERLOAD_SAMPLE = 0.01  # seconds between receive-queue samples (~2 µs warm, 30-50 µs after a wake-up)
# A queue above high-water / QUIET_SHARE is "stirring": sampled every OVERLOAD_SAMPLE by the edge's
# own timer. Below it, a proxy that ticks (the app, every 20 ms) samples in its tick instead: a
# timer of its own woke the loop 100 times a second to read a queue that was empty (an idle
# all-features sidecar: ~2.5 % of a core with it, ~1.7 % without).
QUIET_SHARE = 4
OVERLOAD_WINDOW = 5  # samples in a row above the high-water mark before shedding (>= 50 ms)


_udppump = optional_c("_udppump")  # (without it uvloop's transports do the reading)


EPOCH_SAMPLES = 16  # readings of the wall clock bracketed by the monotonic one, at most
EPOCH_GOOD = 20e-6  # a bracket this narrow ends the sampling


def epoch_clock():
    """time.time()-based seconds that never step: monotonic plus the offset at start. The
    offset rides along as an attribute so that the C pump computes the same sum itself.

    The offset is read between two monotonic readings, and of several tries the narrowest
    bracket is kept: a process preempted between its two clock reads (a loaded machine) would
    otherwise carry the pause in its offset for its whole life, and every timestamp it exports
    would be off by that much against the next hop's (seen: 0.7 ms, hop 2's INVITE span starting
    before hop 1's)."""
    mono = time.monotonic
    width, offset = float("inf"), 0.0
    for _ in range(EPOCH_SAMPLES):
        before = mono()
        wall = time.time()
        after = mono()
        if after - before < width:
            width, offset = after - before, wall - (before + after) / 2
            if width <= EPOCH_GOOD:
                break

    def clock() -> float:
        return mono() + offset

    clock.offset = offset  # type: ignore[attr-defined]
    return clock


class UdpEdge:
    """Feeds datagrams from both sockets to the core and routes its output.

    Two UDP sockets share the listen address (SO_REUSEPORT): one unconnected, for the gateway
    side, and one *connected* to the upstream. The kernel hands the upstream's datagrams to the
    connected socket, and only a connected socket reports ICMP port-unreachable (a dead
    sip-signaling) back as an error, which is counted. Without SO_REUSEPORT one socket does both.

    The core only ever returns IP literals (it resolves no names), so sending is one send per
    output. Nothing raises out of :meth:`dispatch`'s sends: whatever the socket throws is counted.
    """

    def __init__(self, core: ProxyCore, clock):
        self.core = core
        self._receive = core.receive_datagram  # bound once: called for every datagram
        self.stats = core.stats
        self.clock = clock
        self.upstream = core.upstream
        # uvloop's transports, or with the C pump the sockets themselves (upstream_tx: None when
        # one socket does both)
        self.listen_tx: asyncio.DatagramTransport | socket.socket | None = None
        self.upstream_tx: asyncio.DatagramTransport | socket.socket | None = None
        self._send_upstream = None  # payload -> None, on the connected socket
        self._send_to = None  # (payload, dest) -> None, on the listen socket
        self._pump = None  # the C reader (sipwatch._udppump.Pump), when it runs
        self._upstream_poll: select.epoll | None = None  # what the loop watches for the connected socket
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_error: str | None = None
        self._socks: list[socket.socket] = []
        self.guard: OverloadGuard | None = None
        self.overload_window = OVERLOAD_WINDOW  # samples above the mark before shedding (--overload-after)
        self._watch: asyncio.TimerHandle | None = None
        # set before open(): the owner calls sample_tick() every tick, and the edge's own
        # timer runs only while the queue is stirring (QUIET_SHARE)
        self.ticked_sampling = False
        # wiretap(payload, src, dst, ts[, transport]), if set, sees every datagram received and
        # every one sent (None for this proxy's own address), after the sends; it must only
        # queue (the HEP sender), and if it raises that costs the copies, not the message
        self.wiretap = None
        # the TCP edge (sipwatch.tcp), for outputs the core sends over TCP (core.out_tcp)
        self.tcp = None

    def handle(self, data: bytes, addr) -> None:
        """One datagram from uvloop's transports (the path without the C pump)."""
        # IPv4 source addresses already are (host, port); IPv6 ones carry flowinfo/scope too
        src = addr if type(addr) is tuple and len(addr) == 2 else (addr[0], addr[1])
        now = self.clock()
        try:
            self.dispatch(data, src, now, self._receive(data, src, now))
        except Exception as exc:  # noqa: BLE001 - counted here, as the C pump counts it
            self._pump_failed(exc)
        self.core.settle()  # (never raises)

    def dispatch(self, data: bytes, src, now: float, out) -> None:
        """Route the core's output for one datagram: over TCP when the core says so, else one
        datagram each; then the wiretap's copies, when one is set. The C pump sends the common
        case itself and calls this for the rest."""
        if self.core.out_tcp:
            self._to_tcp(data, src, now, out)
            return
        for payload, dest in out:
            self.send(payload, dest)
        if self.wiretap is not None:
            failed = tap_copies(self.wiretap, data, src, now, out, "udp", "udp")
            if failed is not None:
                self.tap_failed(failed)

    def _to_tcp(self, data: bytes, src, now: float, out) -> None:
        """The core's output for this datagram leaves over TCP (a large request toward the
        upstream, a request toward a gateway that uses TCP)."""
        self.core.out_tcp = False
        tcp = self.tcp
        if tcp is not None:
            tcp.now = now
        for payload, dest in out:
            if tcp is not None:
                tcp.send(payload, dest)
            else:
                self.stats.send_errors += 1
        if self.wiretap is not None:
            failed = tap_copies(self.wiretap, data, src, now, out, "udp", "tcp")
            if failed is not None:
                self.tap_failed(failed)

    def send(self, payload: bytes, dest) -> None:
        """One datagram to ``dest``: on the connected socket when it is the upstream, else on
        the listen socket. Never raises."""
        try:
            if dest == self.upstream and self._send_upstream is not None:
                self._send_upstream(payload)
            else:
                self._send_to(payload, dest)
        except OSError as exc:
            self.send_failed(exc)
        except Exception as exc:  # e.g. an address family the socket cannot reach
            self.last_error = self.stats.failed("send", exc)

    def send_failed(self, exc: Exception) -> None:
        self.stats.send_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def tap_failed(self, exc: BaseException) -> None:
        """The wiretap raised (the C pump calls this too): its copies of one message are lost
        and counted; the message itself was already sent."""
        self.last_error = self.stats.failed("hep", exc)

    def _pump_failed(self, exc: BaseException) -> None:
        """An exception out of the core or :meth:`dispatch` (or a failed allocation), caught by
        the C pump: one datagram lost and counted, as the core counts its own failures."""
        self.last_error = self.stats.failed("datagram", exc)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._pump is not None:
            self._loop.remove_reader(self._socks[0].fileno())
            if self._upstream_poll is not None:
                self._loop.remove_reader(self._upstream_poll.fileno())
                self._upstream_poll.close()
            self._pump.close()
            self._pump = None
            for s in self._socks:
                s.close()
            return
        for t in (self.listen_tx, self.upstream_tx):
            if t is not None:
                t.close()

    # -- overload ------------------------------------------------------------------------
    def watch_overload(self, guard: OverloadGuard | None = None) -> None:
        """Sample the receive queues and tell the core when to shed: every OVERLOAD_SAMPLE s, or
        with ``ticked_sampling`` at the owner's tick while the queue is quiet and every
        OVERLOAD_SAMPLE s while it stirs. A burst is seen at most one tick (20 ms) later; the
        window above the mark is still counted in OVERLOAD_SAMPLE steps, as the samples then come
        from the edge's timer alone. Thresholds follow the buffer the kernel really granted
        (net.core.rmem_max caps it)."""
        if guard is None:
            rcvbuf = min(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in self._socks)
            high = min(HIGH_WATER, rcvbuf * 3 // 8)
            # at once halfway from the mark to a full buffer, whatever the window
            guard = OverloadGuard(high, high // 2, self.overload_window, (high + rcvbuf) // 2)
        self.guard = guard
        self._sample()

    def sample_tick(self) -> None:
        """The owner's tick: a sample, unless the edge's own timer is taking them (never raises)."""
        if self.guard is not None and self._watch is None:
            self._sample()

    def _sample(self) -> None:
        self._watch = None
        guard = self.guard
        stirring = True
        try:
            queued = 0
            for s in self._socks:
                n = queued_bytes(s)
                if n < 0:
                    self.guard = None  # no SO_MEMINFO here: never shed (and stop sampling)
                    return
                queued += n
            over = guard.update(queued)
            tcp = self.tcp
            self.core.overloaded = self.stats.overloaded = over or (tcp is not None and tcp.overloaded)
            stirring = queued > guard.high // QUIET_SHARE or guard.overloaded
        except Exception as exc:  # never let the watchdog take the loop down
            self.last_error = self.stats.failed("tick", exc)
        if stirring or not self.ticked_sampling:
            self._watch = asyncio.get_running_loop().call_later(OVERLOAD_SAMPLE, self._sample)

    async def open(self, listen: tuple[str, int], pump: bool = True) -> None:
        """Bind the sockets and start reading: with the C pump when it is built (and ``pump``),
        else with uvloop's datagram transports."""
        loop = self._loop = asyncio.get_running_loop()
        # both readers call core.settle() after the sends: a response leaves before its accounting
        self.core.defer_bookkeeping = True
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        reuse = hasattr(socket, "SO_REUSEPORT")
        if reuse:
            claim_address(family, socket.SOCK_DGRAM, (host, port))
        lsock = _udp_socket(family, reuse)
        lsock.bind((host, port))
        self._socks.append(lsock)
        usock = None
        if reuse:
            usock = _udp_socket(family, True)
            try:
                usock.bind(lsock.getsockname()[:2])
                usock.connect(self.upstream)
            except OSError:
                usock.close()
                usock = None
            else:
                self._socks.append(usock)
        if pump and _udppump is not None:
            self._pump = _udppump.Pump(
                listen_fd=lsock.fileno(), upstream_fd=-1 if usock is None else usock.fileno(),
                upstream=self.upstream, receive=self._receive, core=self.core, edge=self,
                dispatch=self.dispatch, send_failed=self.send_failed, on_error=self._pump_failed,
                clock=self.clock, settle=self.core.settle, refusals=self.core.refusal_params())
            self.listen_tx, self.upstream_tx = lsock, usock
            self._send_to = lsock.sendto
            loop.add_reader(lsock.fileno(), self._pump.read_listen)
            if usock is not None:
                self._send_upstream = usock.send
                # The loop watches the connected socket through an epoll set of its own: an ICMP
                # error pending on the socket polls as POLLERR, on which libuv stops the watcher
                # for good (uvloop's add_reader); the set itself only ever polls readable, and the
                # pump's read takes the error (counted) off the socket.
                self._upstream_poll = select.epoll()
                self._upstream_poll.register(usock.fileno(), select.EPOLLIN)
                loop.add_reader(self._upstream_poll.fileno(), self._pump.read_upstream)
        else:
            self.listen_tx, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=lsock)
            self._send_to = self.listen_tx.sendto
            if usock is not None:
                self.upstream_tx, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=usock)
                self._send_upstream = self.upstream_tx.sendto
        self.watch_overload()


def claim_address(family: int, kind: int, addr: tuple[str, int]) -> None:
    """Raise OSError (EADDRINUSE) if another socket holds ``addr``, SO_REUSEPORT or not.

    This process's own sockets share their port through SO_REUSEPORT (the two UDP sockets, TCP
    connections from the listen port), which would let a second sidecar started on the same
    address (or any program of the same user) bind it as well and silently take a share of the
    traffic: the kernel would hand it the answers to requests the first one forwarded (dropped
    there as strays under another key). A socket without SO_REUSEPORT binds only where nobody
    holds the address, so it is bound once, first, and closed."""
    if not addr[1]:  # an ephemeral port is this process's own
        return
    probe = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:  # (the last run's connections may linger in TIME_WAIT)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr)
    except OSError as exc:
        where = f"{'UDP' if kind == socket.SOCK_DGRAM else 'TCP'} {addr[0]}:{addr[1]}"
        if exc.errno == errno.EADDRINUSE:
            why = f"is in use by another socket (another sidecar?): {exc.strerror}"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"is not an address of this host: {exc.strerror}"
        elif isinstance(exc, socket.gaierror):
            why = f"cannot be bound: name not resolved: {exc.strerror}"
        else:
            why = f"cannot be bound: {exc.strerror or exc}"
        raise OSError(exc.errno, f"{where} {why}") from None
    finally:
        probe.close()


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


def tap_copies(tap, data: bytes, src, now: float, out, came_on: str, left_on: str) -> Exception | None:
    """Hand the wiretap (the HEP mirror) the message that came in over ``came_on`` and each copy
    that left over ``left_on``; called after the sends, so a tap that raises costs only its
    copies. Returns what it raised (the edge counts it), else None."""
    try:
        tap(data, src, None, now, came_on)
        for payload, dest in out:
            tap(payload, None, dest, now, left_on)
    except Exception as exc:  # noqa: BLE001 - a monitoring copy never costs the message
        return exc
    return None


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

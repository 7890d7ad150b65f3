"""The UDP edge over real loopback sockets, with each of its readers: the C pump
(sipwatch/_udppump.c, ``pump``) and uvloop's datagram transports (``uvloop``).

What the peers receive is the ground truth: a request arrives upstream with the proxy's Via on
top of the sender's, a response arrives at the gateway as the upstream sent it less that Via.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
import tracemalloc

import pytest
import uvloop

from harness import HAVE_SIPP, Sidecar, free_port, metric, run_call_pair
from sipwatch import transport
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.transport import UdpEdge, epoch_clock

READERS = ["pump", "uvloop"]
WAIT = 10.0  # seconds to wait for an event that must happen (never a time limit on the code)


def _need(reader: str) -> None:
    if reader == "pump" and transport._udppump is None:
        pytest.skip("the C pump is not built (or SIPWATCH_NO_C=1)")


def run(coro):
    return uvloop.run(coro)


async def until(predicate, what: str):
    for _ in range(int(WAIT / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


class Peer:
    """A non-blocking UDP socket on loopback, read from the test's loop."""

    def __init__(self, host: str, port: int = 0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()[:2]

    async def recv(self) -> bytes:
        for _ in range(int(WAIT / 0.005)):
            try:
                return self.sock.recv(70000)
            except BlockingIOError:
                await asyncio.sleep(0.005)
        raise AssertionError(f"nothing arrived at {self.addr}")

    def close(self) -> None:
        self.sock.close()


def _hostport(addr) -> bytes:
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}".encode()


def options(gw, branch: bytes, body: bytes = b"") -> bytes:
    return (b"OPTIONS sip:ping@" + _hostport(gw) + b" SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP " + _hostport(gw) + b";branch=z9hG4bK" + branch + b"\r\n"
            b"From: <sip:gw@example.com>;tag=f1\r\nTo: <sip:ping@example.com>\r\n"
            b"Call-ID: " + branch + b"@gw\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def answer(request: bytes, size: int | None = None) -> bytes:
    """A 200 to ``request`` as the upstream sends it (every Via copied), padded with a body to
    ``size`` bytes in all when given."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    keep = [h for h in head[1:] if h.split(b":", 1)[0].lower() in (b"via", b"from", b"to", b"call-id", b"cseq")]
    start = b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\n"
    if size is None:
        return start + b"Content-Length: 0\r\n\r\n"
    fixed = len(start) + len(b"Content-Length: 00000\r\n\r\n")
    return start + b"Content-Length: %05d\r\n\r\n" % (size - fixed) + b"x" * (size - fixed)


def own_via(forwarded: bytes) -> bytes:
    """The Via line the proxy put on top of a request it forwarded (with its CRLF)."""
    line = forwarded.split(b"\r\n")[1]
    assert line.startswith(b"Via: "), forwarded[:300]
    return line + b"\r\n"


async def open_edge(reader: str, host: str, upstream, receive=None) -> tuple[UdpEdge, tuple]:
    port = free_port()
    core = ProxyCore(CoreConfig(advertise=(host, port), upstream=upstream))
    edge = UdpEdge(core, epoch_clock())
    if receive is not None:
        edge._receive = receive(core.receive_datagram)
    await edge.open((host, port), pump=reader == "pump")
    assert (edge._pump is not None) == (reader == "pump")
    return edge, (host, port)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("reader", READERS)
def test_a_request_and_its_answer_cross_the_edge(reader, host):
    """Both ways, IPv4 and IPv6 sources: the request reaches the upstream's socket on the
    connected socket's path, the answer reaches the gateway's socket from the listen socket,
    and a 65507-byte answer (the largest IPv4 UDP payload) arrives whole."""
    _need(reader)

    async def main():
        up, gw = Peer(host), Peer(host)
        edge, listen = await open_edge(reader, host, up.addr)
        try:
            assert edge.upstream_tx is not None  # SO_REUSEPORT: a connected upstream socket
            for k, (branch, size) in enumerate(((b"a1", None), (b"a2", 65507))):
                sent = options(gw.addr, branch)
                gw.sock.sendto(sent, listen)
                fwd = await up.recv()
                via = own_via(fwd)
                lines = fwd.replace(via, b"", 1).replace(b"Max-Forwards: 69", b"Max-Forwards: 70").split(b"\r\n")
                assert [x for x in lines if not x.startswith(b"traceparent: ")] == sent.split(b"\r\n")
                assert via.startswith(b"Via: SIP/2.0/UDP " + _hostport(listen) + b";branch=")
                reply = answer(fwd, size)
                if size:
                    assert len(reply) == size
                up.sock.sendto(reply, listen)
                assert await gw.recv() == reply.replace(via, b"", 1)
                # the answer's accounting, which the core holds back until the send, is done
                # by the edge right after it, not by whatever datagram comes next
                assert edge.stats.ring.n == k + 1
            assert edge.stats.send_errors == 0
        finally:
            edge.close()
            up.close()
            gw.close()
    run(main())


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # (Linux; the module may not name it)


def _arrival_stamps_on() -> None:
    """Wait until the kernel stamps datagrams as they arrive. The first socket to ask turns that
    on through deferred work; until it has run, a datagram is stamped when it is read. Called
    once the sidecar's sockets have asked (they keep it on after this probe closes)."""

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            probe.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pytest.skip("no SO_TIMESTAMPNS here")
        probe.bind(("127.0.0.1", 0))
        for _ in range(int(WAIT / 0.02)):
            probe.sendto(b"x", probe.getsockname())
            time.sleep(0.02)
            _, anc, _, _ = probe.recvmsg(16, socket.CMSG_SPACE(16))
            read = time.time()
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack("qq", data[:16])
                    if read - (sec + nsec / 1e9) >= 0.015:  # stamped when it came, not when read
                        return
        raise AssertionError("the kernel never stamped a datagram on arrival")
    finally:
        probe.close()


def test_a_response_is_timed_at_its_arrival_not_when_a_stalled_proxy_reads_it():
    """The pump gives a response its kernel arrival stamp: an upstream that answered at once is
    not charged the 1 s the proxy's loop was stalled before it read the answer (a busy sidecar's
    own delay had shown as sip-signaling's RTT). Bounds from the peers' own clocks: the request
    left after ``t0`` and reached the upstream before ``t1``; the answer left between ``t2a``
    and ``t2b``. Without the stamp the RTT read at least the stall."""
    _need("pump")

    async def main():
        up, gw = Peer("127.0.0.1"), Peer("127.0.0.1")
        edge, listen = await open_edge("pump", "127.0.0.1", up.addr)
        try:
            if not edge._pump.stamped:
                pytest.skip("the sockets take no SO_TIMESTAMPNS here")
            _arrival_stamps_on()
            t0 = time.monotonic()
            gw.sock.sendto(options(gw.addr, b"stall1"), listen)
            fwd = await up.recv()
            t1 = time.monotonic()
            await asyncio.sleep(0.05)  # the upstream's own time to answer, which the RTT must show
            t2a = time.monotonic()
            up.sock.sendto(answer(fwd), listen)
            t2b = time.monotonic()
            time.sleep(1.0)  # the proxy's loop stalled: the answer waits in its socket
            await gw.recv()
            assert edge.stats.ring.n == 1
            rtt = float(edge.stats.ring.rtt[0]) / 1000.0
            assert t2a - t1 - 0.001 <= rtt <= t2b - t0 + 0.001, (rtt, t2a - t1, t2b - t0)
        finally:
            edge.close()
            up.close()
            gw.close()
    run(main())


@pytest.mark.parametrize("reader", READERS)
def test_a_dead_upstreams_icmp_error_is_counted_and_the_edge_keeps_reading(reader):
    """Nothing listens upstream: the kernel's ICMP port unreachable comes back as an error on
    the connected socket, counted once as a send error. Then the upstream comes up and the next
    request reaches it and its answer comes back (the error did not end the loop's watch of that
    socket: libuv stops a watcher at POLLERR). Three times over: the watch is renewed each time."""
    _need(reader)

    async def main():
        gw = Peer("127.0.0.1")
        up_port = free_port()
        edge, listen = await open_edge(reader, "127.0.0.1", ("127.0.0.1", up_port))
        try:
            for round_ in range(3):
                tag = b"%d" % round_
                gw.sock.sendto(options(gw.addr, b"d" + tag), listen)
                await until(lambda: edge.stats.send_errors >= round_ + 1, "the ICMP error")
                assert edge.last_error.startswith("ConnectionRefusedError")
                up = Peer("127.0.0.1", up_port)
                gw.sock.sendto(options(gw.addr, b"u" + tag), listen)
                fwd = await up.recv()
                assert b"branch=z9hG4bKu" + tag in fwd
                up.sock.sendto(answer(fwd), listen)
                back = await gw.recv()
                assert back.startswith(b"SIP/2.0 200 OK") and b"z9hG4bKu" + tag in back
                assert edge.stats.send_errors == round_ + 1
                up.close()
        finally:
            edge.close()
            gw.close()
    run(main())


def test_a_flood_of_sources_only_misses_the_pumps_address_cache():
    """Keep-alives from 8x as many source ports as the pump caches: all are handled (counted),
    and the memory the pump holds does not grow with the number of sources."""
    _need("pump")
    n = 8 * transport._udppump.SRC_CACHE

    async def main():
        edge, listen = await open_edge("pump", "127.0.0.1", ("127.0.0.1", free_port()))

        async def burst(count: int) -> None:
            first = edge.stats.keepalives
            for start in range(0, count, 128):
                socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(min(128, count - start))]
                for s in socks:
                    s.sendto(b"\r\n\r\n", listen)
                await until(lambda: edge.stats.keepalives >= first + start + len(socks), "the keep-alives")
                for s in socks:
                    s.close()

        tracemalloc.start()
        try:
            await burst(n // 4)  # the cache is (nearly) full after this
            before = tracemalloc.get_traced_memory()[0]
            await burst(n - n // 4)
            grown = tracemalloc.get_traced_memory()[0] - before
            assert edge.stats.keepalives == n
            # a source's tuple costs > 100 bytes: kept for each of 3/4 n sources, > 150 KiB
            assert grown < 16 * 1024, grown
        finally:
            tracemalloc.stop()
            edge.close()
    run(main())


def test_a_flood_is_read_in_bounded_batches_so_the_loop_runs_between_them():
    """2000 datagrams queued at once: a callback scheduled while the first one is handled runs
    after at most one batch, not after the whole queue (the tick and the other socket get their
    turn under a flood)."""
    _need("pump")
    seen_at = []

    def noting(receive):
        def wrapped(data, src, now):
            if not seen_at:
                seen_at.append(None)
                asyncio.get_running_loop().call_soon(lambda: seen_at.append(core_calls[0]))
            core_calls[0] += 1
            return receive(data, src, now)
        return wrapped
    core_calls = [0]

    async def main():
        edge, listen = await open_edge("pump", "127.0.0.1", ("127.0.0.1", free_port()), receive=noting)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(2000):
                    s.sendto(b"\r\n\r\n", listen)
            await until(lambda: edge.stats.keepalives == 2000, "the keep-alives")
            assert 1 <= seen_at[1] <= transport._udppump.BATCH < 2000
        finally:
            edge.close()
    run(main())


@pytest.mark.parametrize("reader", READERS)
def test_an_exception_out_of_the_core_costs_one_datagram_and_a_raising_wiretap_none(reader):
    """The core raising (it catches its own errors; this one is injected) costs one datagram,
    counted as an internal error by the edge on both readers, and the reader reads on. A wiretap (HEP) raising costs only its copies: the message was sent
    first, the failure is counted under "hep". The wiretap sees what was received and what was
    sent, both ways, at the edge's clock, on both readers (a response stamped with its arrival
    by the pump, the same time otherwise)."""
    _need(reader)

    def raising(receive):
        def wrapped(data, src, now):
            if data.startswith(b"BOOM"):
                raise RuntimeError("boom")
            return receive(data, src, now)
        return wrapped

    async def main():
        up, gw = Peer("127.0.0.1"), Peer("127.0.0.1")
        edge, listen = await open_edge(reader, "127.0.0.1", up.addr, receive=raising)
        errors = edge.stats.internal_errors
        try:
            gw.sock.sendto(b"BOOM", listen)
            await until(lambda: errors["datagram"] == 1, "the count")
            assert edge.last_error == "RuntimeError: boom"
            seen = []

            def tap(payload, src, dst, ts, transport="udp"):
                if not seen:
                    seen.append(None)
                    raise ValueError("tap")
                seen.append((payload, src, dst, ts))
            edge.wiretap = tap
            gw.sock.sendto(options(gw.addr, b"t0"), listen)
            assert b"branch=z9hG4bKt0" in await up.recv()
            await until(lambda: errors["hep"] == 1, "the tap's failure counted")
            assert errors["datagram"] == 1
            assert edge.last_error == "ValueError: tap" and seen == [None]
            before = edge.clock()
            sent = options(gw.addr, b"t1")
            gw.sock.sendto(sent, listen)
            fwd = await up.recv()
            after = edge.clock()
            assert b"branch=z9hG4bKt1" in fwd
            await until(lambda: len(seen) == 3, "the copies")
            rx, tx = seen[1:]
            assert rx[:3] == (sent, gw.addr, None) and tx[:3] == (fwd, None, up.addr)
            assert before <= rx[3] == tx[3] <= after
            reply = answer(fwd)
            before = edge.clock()
            up.sock.sendto(reply, listen)
            back = await gw.recv()
            after = edge.clock()
            assert back == reply.replace(own_via(fwd), b"", 1)
            await until(lambda: len(seen) == 5, "the answer's copies")
            rx, tx = seen[3:]
            assert rx[:3] == (reply, up.addr, None) and tx[:3] == (back, None, gw.addr)
            # a response as it arrived (the pump: the kernel's stamp, converted from the wall
            # clock, hence the 1-ms allowance), its copy as it left
            assert before - 0.001 <= rx[3] <= tx[3] <= after
            assert errors["datagram"] == 1 and errors["hep"] == 1
        finally:
            edge.close()
            up.close()
            gw.close()
    run(main())


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp")
def test_sipp_calls_through_a_sidecar_without_the_pump(tmp_path):
    """The SIPp suites run the C pump where it is built; a few calls through a sidecar with
    ``SIPWATCH_NO_C=1`` take uvloop's transports (no C extension mapped in the process)."""
    uas_port = free_port()
    with Sidecar(tmp_path, uas_port, env={"SIPWATCH_NO_C": "1"}) as sc:
        with open(f"/proc/{sc.proc.pid}/maps") as f:
            assert "_udppump" not in f.read()
        uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port, uas_port, 5, rate=10)
        assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
        gw = sc.wait_for(lambda s: metric(s, "sip_calls_processed_total", outcome="answered") >= 5)
        assert metric(gw, "sip_calls_processed_total", outcome="answered") == 5
        assert int(uac.stat()["SuccessfulCall(C)"]) == 5


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_sidecar_stopped_for_a_second_does_not_charge_it_to_sip_signaling(tmp_path):
    """The live proxy, stopped (SIGSTOP) after forwarding a request and before the answer came:
    ``signaler_rtt_milliseconds`` reads the upstream's time to answer, not the second the
    answer then waited in the stopped sidecar's socket. Bounds from the peers' clocks, as in
    the test above."""
    _need("pump")
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind(("127.0.0.1", free_port()))
    up.settimeout(WAIT)
    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw.bind(("127.0.0.1", 0))
    gw.settimeout(WAIT)
    try:
        with Sidecar(tmp_path, up.getsockname()[1], "--no-tracing") as sc:
            _arrival_stamps_on()
            t0 = time.monotonic()
            gw.sendto(options(gw.getsockname(), b"stopped1"), ("127.0.0.1", sc.port))
            fwd = up.recv(70000)
            t1 = time.monotonic()
            sc.proc.send_signal(signal.SIGSTOP)
            try:
                for _ in range(int(WAIT / 0.001)):
                    if _stopped(sc.proc.pid):
                        break
                    time.sleep(0.001)
                assert _stopped(sc.proc.pid)
                t2a = time.monotonic()
                up.sendto(answer(fwd), ("127.0.0.1", sc.port))
                t2b = time.monotonic()
                time.sleep(1.0)
            finally:
                sc.proc.send_signal(signal.SIGCONT)
            gw.recv(70000)
            sig = sc.wait_for(lambda s: metric(s, "signaler_rtt_milliseconds_count", method="OPTIONS") >= 1,
                              side="signaling")
            assert metric(sig, "signaler_rtt_milliseconds_count", method="OPTIONS") == 1
            rtt_ms = metric(sig, "signaler_rtt_milliseconds_sum", method="OPTIONS")
            assert (t2a - t1) * 1000 - 1 <= rtt_ms <= (t2b - t0) * 1000 + 1, (rtt_ms, t2a - t1, t2b - t0)
    finally:
        up.close()
        gw.close()


if os.environ.get("SIPWATCH_NO_C") == "1":
    def test_no_c_means_no_pump():
        assert transport._udppump is None


def test_the_pumps_error_paths_release_the_wiretap_once_and_nothing_else():
    """The pump's route(): with a wiretap set and outputs it hands to the Python dispatch, a
    dispatch that raised released the tap twice (one reference lost per datagram: freed, then
    the process crashed, after three); and a core whose out_tcp could not be read released a
    pointer never set (a crash on the first datagram). Driven directly, as the edge drives it."""
    import sys
    from types import SimpleNamespace

    pump = transport._udppump
    if pump is None:
        pytest.skip("the C pump is not built (or SIPWATCH_NO_C=1)")

    class Tap:
        def __call__(self, *a):
            pass

    class Core:
        out_tcp = False

    class Unreadable:
        @property
        def out_tcp(self):
            raise RuntimeError("out_tcp unreadable")

    def dispatch(data, src, now, out):
        raise RuntimeError("dispatch failed")

    tap = Tap()
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", 0))
    listen.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for core in (Core(), Unreadable()):
            errors = []
            p = pump.Pump(listen_fd=listen.fileno(), upstream_fd=-1, upstream=None,
                          # (not an IP literal: the pump hands it to the dispatch)
                          receive=lambda d, s, n: [(b"x", ("gw.example.invalid", 5060))],
                          core=core, edge=SimpleNamespace(wiretap=tap), dispatch=dispatch,
                          send_failed=errors.append, on_error=errors.append, clock=lambda: 0.0)
            before = sys.getrefcount(tap)
            for i in range(5):
                sender.sendto(b"hello %d" % i, listen.getsockname())
                p.read_listen()
            assert len(errors) == 5
            assert sys.getrefcount(tap) == before
            p.close()
    finally:
        listen.close()
        sender.close()

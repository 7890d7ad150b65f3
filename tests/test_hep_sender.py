"""The HEP sender on real sockets: a full queue drops and counts; over TCP the packets arrive
framed by their length field, a collector that goes away costs counted drops and a reconnect
after the back-off, and nothing ever blocks. Frames are split here by the HEPv3 length field
alone, and each must carry the message that was tapped."""
from __future__ import annotations

import select
import socket
import struct
import time

from sipwatch.hep_sender import BACKOFF_MIN, HepSender

SIP = (b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK%d\r\n"
       b"Call-ID: c%d@host\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")


def msg(i: int) -> bytes:
    return SIP % (i, i)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def frames(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off + 6 <= len(data):
        assert data[off:off + 4] == b"HEP3"
        n = struct.unpack(">H", data[off + 4:off + 6])[0]
        out.append(data[off:off + n])
        off += n
    assert off == len(data)
    return out


def read_all(conn: socket.socket, want: int, timeout: float = 10.0) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while len(frames_prefix(buf)) < want and time.monotonic() < deadline:
        r, _, _ = select.select([conn], [], [], 0.2)
        if r:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return buf


def frames_prefix(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off + 6 <= len(data):
        n = struct.unpack(">H", data[off + 4:off + 6])[0]
        if off + n > len(data):
            break
        out.append(data[off:off + n])
        off += n
    return out


def test_full_queue_drops_and_counts_over_udp():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    s = HepSender(("udp", rx.getsockname()), capture_id=7, queue_max=10)
    for i in range(15):
        s.tap(msg(i), ("127.0.0.1", 5070), None, 1000.0 + i)
    assert s.dropped["queue_full"] == 5
    assert s.flush() == 10 and s.sent == 10
    got = [rx.recv(65535) for _ in range(10)]
    for i, d in enumerate(got):
        assert struct.unpack(">H", d[4:6])[0] == len(d) and d.endswith(msg(i))
        assert b"c%d@host" % i in d  # the correlation id chunk
    rx.close()
    s.close()


def test_tcp_collector_restart_reconnects_after_backoff():
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    addr = lst.getsockname()
    clock = Clock()
    s = HepSender(("tcp", addr), clock=clock)
    for i in range(100):
        s.tap(msg(i), ("127.0.0.1", 5070), ("127.0.0.1", 5060), 1000.0)
    deadline = time.monotonic() + 10
    while s.sent < 100 and time.monotonic() < deadline:
        s.flush()  # the first flush may find the connection still being made
        time.sleep(0.01)
    conn, _ = lst.accept()
    got = frames(read_all(conn, 100))
    assert [g[-len(msg(i)):] for i, g in enumerate(got)] == [msg(i) for i in range(100)]
    # the collector goes away
    conn.close()
    lst.close()
    for attempt in range(50):
        s.tap(msg(0), ("127.0.0.1", 5070), None, 1000.0)
        s.flush()
        if s.sock is None:
            break
        time.sleep(0.02)
    assert s.sock is None and s.last_error
    lost = s.dropped["collector_down"] + s.dropped["send_error"]
    assert s.sent + lost + len(s.queue) >= 100 + 1
    # during the back-off nothing is attempted: messages are dropped and counted at once
    s.tap(msg(1), None, ("127.0.0.1", 5070), 1000.0)
    before = s.dropped["collector_down"]
    s.flush()
    assert s.dropped["collector_down"] == before + 1 and s.sock is None
    # the collector is back on the same address; after the back-off the sender reconnects
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(addr)
    lst.listen(1)
    clock.t += BACKOFF_MIN * 2 ** 6
    sent_before = s.sent
    s.tap(msg(7), ("127.0.0.1", 5070), None, 1000.0)
    deadline = time.monotonic() + 10
    while s.sent == sent_before and time.monotonic() < deadline:
        s.flush()
        time.sleep(0.01)
    conn, _ = lst.accept()
    got = frames(read_all(conn, 1))
    assert len(got) == 1 and got[0].endswith(msg(7))
    conn.close()
    lst.close()
    s.close()


def test_a_raising_tap_costs_no_message_over_tcp_either():
    """The TCP edge forwards first and taps after: a tap that raises loses its copies (counted
    under "hep"), never the request it was copying."""
    from sipwatch.core import CoreConfig, ProxyCore
    from sipwatch.tcp import TcpEdge, _Conn

    upstream = ("127.0.0.1", 5060)
    core = ProxyCore(CoreConfig(advertise=("127.0.0.1", 5070), upstream=upstream))
    sent = []
    edge = TcpEdge(core, Clock(), lambda payload, dest: sent.append((payload, dest)))
    conn = _Conn(edge, None)
    conn.peer = ("127.0.0.1", 40123)

    def tap(*copy):
        raise ValueError("tap")
    edge.wiretap = tap
    request = (b"OPTIONS sip:ping@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40123;branch=z9hG4bK1\r\n"
               b"From: <sip:gw@example.com>;tag=f1\r\nTo: <sip:ping@example.com>\r\nCall-ID: c1@gw\r\n"
               b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    edge.handle(conn, request)
    assert len(sent) == 1 and sent[0][1] == upstream and b"branch=z9hG4bK1" in sent[0][0]
    assert core.stats.internal_errors["hep"] == 1 and core.stats.internal_errors["datagram"] == 0
    assert edge.last_error == "ValueError: tap"


def test_tcp_connects_with_a_descriptor_past_1023():
    """The proxy raises its descriptor limit for thousands of SIP/TCP connections, so the HEP
    socket, opened again after each collector failure, can get a number past 1023, which
    ``select.select`` refuses: the sender then never connected (every try a ValueError)."""
    import os
    import resource
    import pytest
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"descriptor limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    held = []
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        s = HepSender(("tcp", lst.getsockname()), clock=Clock())
        s.tap(msg(3), ("127.0.0.1", 5070), ("127.0.0.1", 5060), 1000.0)
        deadline = time.monotonic() + 10
        while s.sent < 1 and s.last_error is None and time.monotonic() < deadline:
            s.flush()
            time.sleep(0.01)
        assert s.sent == 1 and s.last_error is None and s.sock.fileno() > 1023, s.last_error
        while held:  # (the test's own reader uses select)
            os.close(held.pop())
        conn, _ = lst.accept()
        got = frames(read_all(conn, 1))
        assert len(got) == 1 and got[0].endswith(msg(3))
        conn.close()
        s.close()
    finally:
        for fd in held:
            os.close(fd)
        lst.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_message_too_large_for_a_datagram_is_dropped_alone():
    """A HEP packet may be 65535 bytes, a UDP datagram over IPv4 only 65507: a peer's ~65-KB
    message was refused by send (EMSGSIZE), taken for a dead collector, and the whole batch and
    the back-off after it were dropped. Now that packet alone is dropped, as ``too_large``."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.settimeout(5)
    s = HepSender(("udp", rx.getsockname()), clock=Clock())
    big = msg(0)[:-4] + b"X" * (65410 - len(msg(0))) + b"\r\n\r\n"  # its HEP packet: ~65,520 bytes
    for i in range(1, 51):
        s.tap(msg(i), ("127.0.0.1", 5070), ("127.0.0.1", 5060), 1000.0)
        if i == 10:
            s.tap(big, ("127.0.0.1", 5070), ("127.0.0.1", 5060), 1000.0)
    assert s.flush() == 50
    assert s.dropped == {"queue_full": 0, "send_error": 0, "collector_down": 0, "too_large": 1}
    got = [rx.recv(70000) for _ in range(50)]
    assert [g[-len(msg(i)):] for i, g in zip(range(1, 51), got)] == [msg(i) for i in range(1, 51)]
    assert s.sock is not None and s.last_error is None
    rx.close()
    s.close()


def test_backoff_grows_against_a_dead_udp_collector():
    """A connected UDP socket takes its first datagram to a closed port; the ICMP error answers
    the next. That first success used to reset the back-off, so a dead collector was tried every
    0.5 s for good; now the wait doubles until a socket outlives one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()
    clock = Clock()
    s = HepSender(("udp", dead), clock=clock)
    opened = 0
    for _ in range(400):  # 40 s of 0.1-s ticks
        had = s.sock is not None
        s.tap(msg(1), ("127.0.0.1", 5070), ("127.0.0.1", 5060), 1000.0)
        s.flush()
        opened += s.sock is not None and not had
        time.sleep(0.002)  # the ICMP error comes back
        clock.t += 0.1
    assert s.last_error and "refused" in s.last_error.lower()
    assert s.backoff > 8 and opened <= 8, (s.backoff, opened)
    s.close()


def test_hep_local_address_is_an_ip_when_advertise_is_a_host_name():
    """Every record of the proxy's own side carries its address; a host name (accepted by
    --advertise, common in Via) made every encode fail, counted as ``too_large``."""
    from sipwatch.hep import ip_bytes
    from sipwatch.hep_sender import local_address
    assert local_address(("127.0.0.1", 5060), ("sip.example.com", 5060)) == ("127.0.0.1", 5060)
    assert local_address(("0.0.0.0", 5060), ("10.1.2.3", 5070)) == ("10.1.2.3", 5060)
    host, port = local_address(("0.0.0.0", 5060), ("sip.example.com", 5060))
    assert port == 5060 and ip_bytes(host)


def test_endpoint_ports_and_capture_ids_are_ascii_digits():
    import pytest
    from sipwatch.hep_sender import EndpointError, hep_options, parse_endpoint
    for text in ("udp:127.0.0.1:9\u00b2", "tcp:[::1]:\u0669\u0660\u0666\u0660"):
        with pytest.raises(EndpointError):
            parse_endpoint(text)
    with pytest.raises(EndpointError):
        hep_options(lambda name, default: ("\u00b2", "--hep-capture-id") if name == "hep-capture-id"
                    else (default, name), lambda name: False)

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

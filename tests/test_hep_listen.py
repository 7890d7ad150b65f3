"""``sipwatch capture --hep-listen`` against hostile senders. Its TCP listener under connections
that hold its table: silent connections must not lock a HEP sender out (the table was full at
MAX_TCP_CONNECTIONS and every later connection, an honest sender's included, was refused for as
long as the silent ones stayed, up to TCP_IDLE = 300 s each and renewable at will). Real sockets
on loopback; each wait below is for a condition, bounded only against a hang."""
from __future__ import annotations

import asyncio

from capture import hep_listen
from capture.hep_listen import MAX_TCP_CONNECTIONS, HepReceiver
from harness import collector_off_traced
from sipwatch.hep import encode_hep3

HANG = 60.0  # seconds: a guard against a hang, never a measure


def hep_sip(i: int, auth_key: bytes = b"") -> bytes:
    sip = (f"OPTIONS sip:b@10.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{i}\r\n"
           f"Call-ID: hep-listen-{i}\r\nCSeq: 1 OPTIONS\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\n"
           "Content-Length: 0\r\n\r\n").encode()
    return encode_hep3(sip, ("10.0.0.1", 5060), ("10.0.0.2", 5060), 1700000000.0 + i, auth_key=auth_key)


async def until(cond) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + HANG
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def serve(rx: HepReceiver) -> int:
    await rx.listen("tcp", ("127.0.0.1", 0))
    return rx.servers[0].sock.getsockname()[1]


async def shut(rx: HepReceiver, writers) -> None:
    """Close the clients, wait for the receiver to see every connection go, close it."""
    for w in writers:
        w.close()
    await until(lambda: rx.connections == 0)
    rx.close()


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), HANG) == b""
    except ConnectionError:
        return True


def test_silent_connections_cannot_lock_a_sender_out_and_a_delivering_one_keeps_its_place():
    async def main():
        fed = []
        rx = HepReceiver(lambda payload, *a: fed.append(payload))
        port = await serve(rx)
        # an honest sender connects and delivers one packet
        _, honest_a = await asyncio.open_connection("127.0.0.1", port)
        honest_a.write(hep_sip(1))
        await until(lambda: len(fed) == 1)
        # twice the table in connections that send nothing
        silent = []
        for _ in range(2 * MAX_TCP_CONNECTIONS):
            silent.append(await asyncio.open_connection("127.0.0.1", port))
            assert rx.connections <= MAX_TCP_CONNECTIONS
        # (accepted connections join the table from their own task: the count can trail the
        # refusals by a few on a busy machine)
        await until(lambda: rx.rejected["tcp_connections"] == MAX_TCP_CONNECTIONS + 1
                    and rx.connections == MAX_TCP_CONNECTIONS)
        assert rx.connections == MAX_TCP_CONNECTIONS
        # the first sender was not the one closed: its next packet is read
        honest_a.write(hep_sip(2))
        await until(lambda: len(fed) == 2)
        # a second sender arriving now gets in and is read (before: refused, reset)
        _, honest_b = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3, 8):
            honest_b.write(hep_sip(i))
        await honest_b.drain()
        await until(lambda: len(fed) == 7)
        assert [p.split(b"Call-ID: ")[1].split(b"\r\n")[0] for p in fed] == \
            [b"hep-listen-%d" % i for i in range(1, 8)]
        assert rx.connections == MAX_TCP_CONNECTIONS
        # the silent connections were the ones closed, oldest first
        assert all([await closed_by_peer(r) for r, _ in silent[:MAX_TCP_CONNECTIONS + 2]])
        await shut(rx, [w for _, w in silent] + [honest_a, honest_b])

    asyncio.run(main())


def test_with_an_auth_key_a_wrong_key_does_not_earn_a_place(monkeypatch):
    monkeypatch.setattr(hep_listen, "MAX_TCP_CONNECTIONS", 8)
    key = b"right-key"

    async def main():
        fed = []
        rx = HepReceiver(lambda payload, *a: fed.append(payload), auth_key=key)
        port = await serve(rx)
        _, honest = await asyncio.open_connection("127.0.0.1", port)
        honest.write(hep_sip(1, key))
        await until(lambda: len(fed) == 1)
        # forgers send packets with a wrong key, each after the honest sender's last packet
        forgers = []
        for i in range(8):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(hep_sip(100 + i, b"wrong-key"))
            forgers.append((r, w))
        await until(lambda: rx.rejected["auth"] == 8)
        assert rx.rejected["tcp_connections"] == 1 and rx.connections == 8
        honest.write(hep_sip(2, key))  # still open: a forger was closed to make room
        await until(lambda: len(fed) == 2)
        assert await closed_by_peer(forgers[0][0])
        await shut(rx, [w for _, w in forgers] + [honest])

    asyncio.run(main())


def test_when_every_connection_delivers_the_one_quiet_longest_makes_room(monkeypatch):
    monkeypatch.setattr(hep_listen, "MAX_TCP_CONNECTIONS", 8)

    async def main():
        fed = []
        rx = HepReceiver(lambda payload, *a: fed.append(payload))
        port = await serve(rx)
        conns = []
        for i in range(8):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(hep_sip(i))
            conns.append((r, w))
            await until(lambda: len(fed) == i + 1)
        conns[0][1].write(hep_sip(100))  # the first is active again: the second is now quietest
        await until(lambda: len(fed) == 9)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(hep_sip(200))
        await until(lambda: len(fed) == 10)
        assert await closed_by_peer(conns[1][0])
        assert rx.connections == 8 and rx.rejected["tcp_connections"] == 1
        conns[0][1].write(hep_sip(300))
        await until(lambda: len(fed) == 11)
        await shut(rx, [cw for _, cw in conns] + [w])

    asyncio.run(main())


def test_connections_are_accepted_within_a_budget_and_packets_over_udp_still_flow():
    """A client connecting in a loop cannot take the capture's loop: connections are accepted as
    a token bucket allows (here three, then none), the rest wait in the kernel's queue, and HEP
    over UDP on the same loop is read meanwhile (before: every connection accepted at once)."""
    from sipwatch.metrics import TokenBucket

    async def main():
        fed = []
        rx = HepReceiver(lambda payload, *a: fed.append(payload))
        await rx.listen("tcp", ("127.0.0.1", 0), accepts=TokenBucket(0.0, 3))
        port = rx.servers[0].sock.getsockname()[1]
        await rx.listen("udp", ("127.0.0.1", 0))
        udp_port = rx.transports[0].get_extra_info("sockname")[1]
        writers = []
        for i in range(6):
            _, w = await asyncio.open_connection("127.0.0.1", port)  # (the kernel completes them)
            w.write(hep_sip(i))
            writers.append(w)
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", udp_port))
        await until(lambda: len(fed) == 3)
        udp.sendto(hep_sip(100))
        await until(lambda: len(fed) == 4)
        await asyncio.sleep(0.15)  # (three of the listener's pauses: it looked again, found no token)
        udp.sendto(hep_sip(101))
        await until(lambda: len(fed) == 5)
        assert rx.connections == 3
        assert sorted(p.split(b"Call-ID: ")[1].split(b"\r\n")[0] for p in fed) == \
            sorted([b"hep-listen-%d" % i for i in (0, 1, 2)] + [b"hep-listen-100", b"hep-listen-101"])
        udp.close()
        for w in writers:
            w.close()
        rx.close()

    asyncio.run(main())


A_END, B_END = ("10.0.0.1", 5060), ("10.0.0.2", 5060)


def _hep_capture(clock=None):
    """A live capture fed by a HEP receiver (packets handed in, no socket), and its log."""
    import io

    from capture.live import LiveCapture, RtpMonitor
    from sipwatch.logs import JsonLog
    buf = io.BytesIO()
    lc = LiveCapture("x", "", None, rtp=RtpMonitor(grace=0.0), log=JsonLog("cap", stream=buf))
    rx = HepReceiver(lc.feed, b"", on_rtcp=lc.rtcp.add, **({} if clock is None else {"clock": clock}))
    return lc, rx, buf


def _dialog_message(call_id: bytes):
    """msg(first line, method, to_tag=b""): a message of one INVITE dialog from A_END to B_END."""
    def msg(first, m, to_tag=b""):
        return (first + b"\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK" + call_id + m + b"\r\n"
                b"From: <sip:alice@10.0.0.1>;tag=1\r\nTo: <sip:bob@10.0.0.2>" + to_tag +
                b"\r\nCall-ID: " + call_id + b"\r\nCSeq: 1 " + m + b"\r\nContent-Length: 0\r\n\r\n")
    return msg


def test_a_packet_stamped_far_ahead_does_not_time_out_the_calls_in_progress():
    """The observer's timers run on the packets' times, and a HEP packet's time is its sender's
    word: one packet stamped in 2106 (even one that is not SIP) timed out every transaction in
    progress, and their later answers were unmatched. Outside [now - MAX_BEHIND, now + MAX_AHEAD]
    a packet's time is clamped into it (counted)."""
    import time

    lc, rx, buf = _hep_capture()
    a, b = A_END, B_END
    msg = _dialog_message(b"victim")

    now = time.time()
    rx.packet(encode_hep3(msg(b"INVITE sip:bob@10.0.0.2 SIP/2.0", b"INVITE"), a, b, now))
    rx.packet(encode_hep3(msg(b"SIP/2.0 180 Ringing", b"INVITE", b";tag=2"), b, a, now + 0.05))
    rx.packet(encode_hep3(b"x", ("198.51.100.7", 1), ("198.51.100.8", 2), 4294967295.0))  # forged
    rx.packet(encode_hep3(msg(b"SIP/2.0 200 OK", b"INVITE", b";tag=2"), b, a, now + 0.1))
    rx.packet(encode_hep3(msg(b"ACK sip:bob@10.0.0.2 SIP/2.0", b"ACK", b";tag=2"), a, b, now + 0.2))
    lc.housekeeping(now + 0.3)
    call = lc.observer.tracker.calls[b"victim"]
    assert call.status == 200 and not any(tx.timed_out for tx in call.transactions)
    assert lc.observer.unmatched_responses == 0 and rx.retimed == 1
    assert b'"timeout"' not in buf.getvalue()


def test_a_sender_lagging_past_timer_b_does_not_turn_answered_calls_into_timeouts():
    """Packets stamped up to 60 s behind were taken as stamped while the housekeeping tick
    expires transactions on this host's clock: an INVITE and its 200 arriving 0.1 s apart from
    a sender 33 s behind were a timeout and an unmatched response."""
    now = [1_800_000_000.0]
    lc, rx, _ = _hep_capture(lambda: now[0])
    a, b = A_END, B_END
    msg = _dialog_message(b"lagging")

    lag = 33.0
    rx.packet(encode_hep3(msg(b"INVITE sip:bob@10.0.0.2 SIP/2.0", b"INVITE"), a, b, now[0] - lag))
    now[0] += 0.05
    lc.housekeeping(now[0])
    now[0] += 0.05
    rx.packet(encode_hep3(msg(b"SIP/2.0 200 OK", b"INVITE", b";tag=2"), b, a, now[0] - lag))
    lc.housekeeping(now[0])
    call = lc.observer.tracker.calls[b"lagging"]
    assert call.status == 200 and not any(tx.timed_out for tx in call.transactions)
    assert lc.observer.unmatched_responses == 0 and rx.retimed == 2


def test_a_bug_a_packet_reaches_is_reported_as_one_not_as_a_malformed_packet():
    errors = []

    def feed(*args):
        raise RuntimeError("observer bug")

    rx = HepReceiver(feed, b"", on_error=lambda component, exc: errors.append((component, str(exc))))
    assert rx.packet(encode_hep3(b"OPTIONS sip:x SIP/2.0\r\n\r\n", ("10.0.0.1", 1), ("10.0.0.2", 2), 1.7e9)) is False
    assert errors == [("hep", "observer bug")] and rx.rejected["bad_chunk"] == 0


def test_a_sender_just_past_the_window_keeps_its_messages_in_order():
    """Stamps outside the window were set to now: a sender ~0.5 s ahead had its INVITE (+0.45 s,
    kept) after its 200 (+0.55 s, set to now): a setup time of -0.25 s. They are clamped now."""
    now = [1_800_000_000.0]
    lc, rx, _ = _hep_capture(lambda: now[0])
    a, b = A_END, B_END
    msg = _dialog_message(b"skewed")

    rx.packet(encode_hep3(msg(b"INVITE sip:bob@10.0.0.2 SIP/2.0", b"INVITE"), a, b, now[0] + 0.45))
    now[0] += 0.05
    rx.packet(encode_hep3(msg(b"SIP/2.0 200 OK", b"INVITE", b";tag=2"), b, a, now[0] + 0.55))
    call = lc.observer.tracker.calls[b"skewed"]
    assert call.status == 200 and call.t_answer >= call.t_start


def test_senders_that_close_mid_frame_leave_nothing_behind_with_the_collector_off():
    """A connection closed in the middle of a frame ended its reader with an exception whose
    traceback held the reader (and what it had read) in a reference cycle until a full
    collection: 300 senders left 16 MB; with the collector off they must leave under 1 MB."""
    import tracemalloc

    async def main():
        rx = HepReceiver(lambda payload, *a: None)
        port = await serve(rx)
        frame = hep_sip(1)
        # a frame whose length field says more than is sent before the close
        whole = frame[:4] + (60000).to_bytes(2, "big") + frame[6:] + b"x" * 50000
        _, w = await asyncio.open_connection("127.0.0.1", port)  # (warm)
        w.transport.abort()
        await until(lambda: rx.connections == 0)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(whole)
            await w.drain()
            await asyncio.sleep(0)
            w.transport.abort()
        await until(lambda: rx.connections == 0)
        await asyncio.sleep(0.2)
        held = tracemalloc.get_traced_memory()[0] - before
        rx.close()
        return held

    with collector_off_traced():
        held = asyncio.run(main())
    assert held < 1 << 20, held


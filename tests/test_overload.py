"""Shedding instead of collapsing (issue 10): while the receive queues are long, new dialogs get an
immediate 503 + Retry-After; in-dialog requests, OPTIONS and responses keep flowing; the ACK of
a 503 the sidecar sent itself stops there."""
from __future__ import annotations

import select
import signal
import socket
import time

import pytest

from sipwatch.overload import OverloadGuard
from sipwatch.sipmsg import parse

from harness import Sidecar, free_port, metric
from test_core import GATEWAY, SIGNALING, T0, invite, response_to
from test_hardening import forwarded, make


def test_guard_hysteresis():
    g = OverloadGuard(high=1000, low=100)
    assert [g.update(q) for q in (0, 999, 1001, 500, 101, 99, 500, -1)] == \
        [False, False, True, True, True, False, False, False]
    assert g.episodes == 1
    with pytest.raises(ValueError):
        OverloadGuard(high=10, low=10)


def test_guard_sheds_on_a_standing_queue_not_a_burst():
    g = OverloadGuard(high=1000, low=100, window=3)
    assert [g.update(q) for q in (5000, 5000, 50, 5000, 5000, 900, 5000)] == [False] * 7
    assert [g.update(q) for q in (5000, 5000, 5000, 800, 99)] == [False, True, True, True, False]


def test_guard_sheds_at_once_when_the_buffer_is_about_to_overflow():
    """Above ``urgent`` the window is not waited for: a queue growing at twice the capacity's
    rate would overflow the buffer (and the kernel drop datagrams of admitted calls) first."""
    g = OverloadGuard(high=1000, low=100, window=5, urgent=4000)
    assert [g.update(q) for q in (2000, 3000, 4000, 4001, 3000, 200, 99)] == \
        [False, False, False, True, True, True, False]
    assert g.episodes == 1
    with pytest.raises(ValueError):
        OverloadGuard(high=1000, low=100, urgent=1000)


def test_overloaded_core_sheds_new_dialogs_only():
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    core.overloaded = True
    # the call admitted before keeps going: its answer, ACK and BYE pass
    assert [a for _, a in core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.1)] == [GATEWAY]
    ack = invite(method=b"ACK", to_tag=b"uas-1", body=b"")
    assert [a for _, a in forwarded(core.receive_datagram(ack, GATEWAY, T0 + 0.2))] == [SIGNALING]
    # a new INVITE is answered 503 with Retry-After, at once, to where it came from
    new = invite(call_id=b"new-1", branch=b"z9hG4bK-new-1")
    out = core.receive_datagram(new, GATEWAY, T0 + 0.3)
    assert len(out) == 1 and out[0][1] == GATEWAY
    resp = parse(out[0][0])
    assert resp.status == 503 and resp.get(b"retry-after") and core.stats.overload_rejected == 1
    # its ACK (hop by hop, RFC 3261 §17.1.1.3) is absorbed, not sent on to signaling
    tag = parse(out[0][0]).get(b"to").split(b"tag=")[1]
    ack503 = invite(method=b"ACK", call_id=b"new-1", branch=b"z9hG4bK-new-1", to_tag=tag, body=b"")
    assert core.receive_datagram(ack503, GATEWAY, T0 + 0.31) == []
    # OPTIONS (health checks) and in-dialog requests still pass
    opt = invite(method=b"OPTIONS", call_id=b"opt-1", body=b"")
    assert [a for _, a in forwarded(core.receive_datagram(opt, GATEWAY, T0 + 0.4))] == [SIGNALING]
    bye = invite(method=b"BYE", cseq=2, to_tag=b"uas-1", body=b"")
    assert [a for _, a in forwarded(core.receive_datagram(bye, GATEWAY, T0 + 0.5))] == [SIGNALING]
    core.overloaded = False
    assert forwarded(core.receive_datagram(invite(call_id=b"new-2"), GATEWAY, T0 + 1))


@pytest.mark.parametrize("fast", [True, False])
def test_a_retransmitted_invite_of_an_admitted_call_is_not_refused(fast):
    """Under overload the 100 Trying can be late, and the caller retransmits its INVITE (Timer A).
    That call was admitted: a 503 to the retransmission would fail it while the callee may be
    answering. It goes on as any retransmission; a new INVITE reusing the Call-ID after the call
    was answered or rejected is new, and refused (the tracker's reading of "the same call")."""
    core = make()
    core.fast_refusals = fast
    first = invite(call_id=b"adm-1", branch=b"z9hG4bK-adm-1")
    (fwd, _), = forwarded(core.receive_datagram(first, GATEWAY, T0))
    core.overloaded = True
    again = forwarded(core.receive_datagram(first, GATEWAY, T0 + 0.5))
    assert [a for _, a in again] == [SIGNALING] and again[0][0] == fwd
    assert core.stats.overload_rejected == 0
    core.receive_datagram(response_to(fwd, 486), SIGNALING, T0 + 0.6)
    retry = invite(call_id=b"adm-1", branch=b"z9hG4bK-adm-2", cseq=2)
    out = core.receive_datagram(retry, GATEWAY, T0 + 0.7)
    assert parse(out[0][0]).status == 503 and out[0][1] == GATEWAY and core.stats.overload_rejected == 1


@pytest.mark.parametrize("draining", [False, True])
def test_a_retransmitted_request_of_a_new_non_invite_dialog_is_not_refused(draining):
    """A MESSAGE (or REGISTER, SUBSCRIBE) forwarded before the shedding began and retransmitted
    (Timer E) is answered by the next hop: a 503 to the copy would give its transaction a second,
    contrary final answer. It is known by its branch; a new one (another CSeq) is refused."""
    core = make()
    first = invite(call_id=b"msg-1", branch=b"z9hG4bK-msg-1", method=b"MESSAGE", body=b"hi")
    (fwd, _), = forwarded(core.receive_datagram(first, GATEWAY, T0))
    core.draining, core.overloaded = draining, not draining
    again = forwarded(core.receive_datagram(first, GATEWAY, T0 + 0.5))
    assert [a for _, a in again] == [SIGNALING] and again[0][0] == fwd
    assert core.stats.request_retransmissions == 1
    assert core.stats.overload_rejected == core.stats.drain_rejected == 0
    new = invite(call_id=b"msg-1", branch=b"z9hG4bK-msg-2", method=b"MESSAGE", body=b"hi", cseq=2)
    out = core.receive_datagram(new, GATEWAY, T0 + 0.6)
    assert parse(out[0][0]).status == 503 and out[0][1] == GATEWAY
    other = invite(call_id=b"msg-2", branch=b"z9hG4bK-msg-3", method=b"MESSAGE", body=b"hi")
    out = core.receive_datagram(other, GATEWAY, T0 + 0.7)  # (a Call-ID never seen: refused at once)
    assert parse(out[0][0]).status == 503 and b"msg-2" not in core.tracker.calls
    assert (core.stats.drain_rejected if draining else core.stats.overload_rejected) == 2
    assert len(core.tracker.calls[b"msg-1"].transactions) <= 1


def test_forged_ack_with_a_sw_tag_is_not_swallowed():
    """Only the ACK of our own 503 is absorbed: a To-tag that merely looks like ours passes on."""
    core = make()
    ack = invite(method=b"ACK", to_tag=b"sw0123456789ab", body=b"")
    assert forwarded(core.receive_datagram(ack, GATEWAY, T0))


def rx_queue(port: int) -> int:
    """Bytes queued on the unconnected UDP socket(s) bound to ``port`` (IPv4), from /proc/net/udp."""
    total = 0
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and remote.endswith(":0000"):
                total += int(queues.split(":")[1], 16)
    return total


def test_live_sidecar_sheds_a_backlog_with_503(tmp_path):
    """A sidecar that could not read for a while (SIGSTOP) finds a backlog of new INVITEs: it answers
    the excess 503 at once instead of forwarding every one late. Every INVITE is either forwarded or
    answered: none is lost.

    ``--overload-after 0.01``: shed from the first queue sample above the mark. With the default
    (five samples, 50 ms) whether a backlog is shed depends on how fast this machine drains it: a
    sidecar that works it off within 50 ms is right not to shed (a faster core made that happen)."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    upstream.bind(("127.0.0.1", free_port()))
    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    gw.bind(("127.0.0.1", 0))
    gw_port = gw.getsockname()[1]
    with Sidecar(tmp_path, upstream.getsockname()[1], "--no-tracing", "--overload-after", "0.01") as sc:
        # The sidecar asks for a 4 MB receive buffer; the kernel grants up to net.core.rmem_max
        # (doubled), as it does to this probe. The backlog fills it to about 60 % (read back from
        # /proc/net/udp, since the kernel's bytes per datagram vary): past the 3/8 high-water mark,
        # short of overflowing.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rcvbuf = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        probe.close()
        n = 0
        sc.proc.send_signal(signal.SIGSTOP)
        try:
            while rx_queue(sc.port) < rcvbuf * 0.6 and n < 20_000:
                for _ in range(20):
                    req = invite(call_id=b"backlog-%d" % n, branch=b"z9hG4bK-bl-%d" % n).replace(
                        b"10.0.0.1:5070", b"127.0.0.1:%d" % gw_port)
                    gw.sendto(req, ("127.0.0.1", sc.port))
                    n += 1
        finally:
            sc.proc.send_signal(signal.SIGCONT)
        rejected, forwarded_n = 0, 0
        refused_id = b""
        deadline = time.monotonic() + 20
        while rejected + forwarded_n < n and time.monotonic() < deadline:
            ready, _, _ = select.select([gw, upstream], [], [], 0.5)
            for sock in ready:
                data = sock.recv(65535)
                if sock is gw and data.startswith(b"SIP/2.0 503 ") and b"\r\nRetry-After: " in data:
                    rejected += 1
                    refused_id = parse(data).get(b"call-id")
                elif sock is upstream and data.startswith(b"INVITE "):
                    forwarded_n += 1
        # shedding stops once the queue is short: a new INVITE after the backlog (and a few
        # 10-ms samples of the empty queue) is forwarded. (Whether part of the backlog itself
        # was forwarded depends on how fast this machine works it off between two samples.)
        time.sleep(0.2)
        gw.sendto(invite(call_id=b"after-backlog", branch=b"z9hG4bK-after").replace(
            b"10.0.0.1:5070", b"127.0.0.1:%d" % gw_port), ("127.0.0.1", sc.port))
        after = b""
        deadline = time.monotonic() + 10
        while b"after-backlog" not in after and time.monotonic() < deadline:
            ready, _, _ = select.select([upstream], [], [], 0.5)
            if ready:
                after = upstream.recv(65535)
        # a copy of a refused INVITE (its caller's Timer A), now that the shedding has stopped:
        # the same 503 again, not the callee (the pump refused the original)
        i = int(refused_id.rsplit(b"-", 1)[1])
        gw.sendto(invite(call_id=b"backlog-%d" % i, branch=b"z9hG4bK-bl-%d" % i).replace(
            b"10.0.0.1:5070", b"127.0.0.1:%d" % gw_port), ("127.0.0.1", sc.port))
        copy_answer, copy_forwarded = b"", False
        deadline = time.monotonic() + 10
        while not copy_answer and time.monotonic() < deadline:
            ready, _, _ = select.select([gw, upstream], [], [], 0.5)
            for sock in ready:
                data = sock.recv(65535)
                if sock is gw:
                    copy_answer = data
                elif b"backlog-%d\r\n" % i in data:
                    copy_forwarded = True
        samples = sc.gateway()
    upstream.close()
    gw.close()
    assert rejected + forwarded_n == n
    assert rejected > 0
    assert after.startswith(b"INVITE ") and b"after-backlog" in after
    assert copy_answer.startswith(b"SIP/2.0 503 ") and parse(copy_answer).get(b"call-id") == refused_id
    assert not copy_forwarded
    assert metric(samples, "sip_overload_rejected_total") == rejected + 1


def test_a_quiet_queue_is_sampled_at_the_tick_and_a_stirring_one_by_the_edges_timer(monkeypatch):
    """A sampling timer of its own woke an idle sidecar 100 times a second (~3 % of its CPU at
    1000 calls/s). With ``ticked_sampling`` the owner's tick samples while the queue is quiet;
    from a quarter of the high-water mark the edge samples every OVERLOAD_SAMPLE s again (the
    tick adds none then, so the window still counts 10-ms steps), until the queue is quiet."""
    import asyncio

    import uvloop

    from sipwatch import transport
    queue, samples = [0], []

    def fake_queue(sock):  # (the queue, and whether the core sheds before this sample)
        samples.append((queue[0], core.overloaded))
        return queue[0]

    monkeypatch.setattr(transport, "queued_bytes", fake_queue)
    core = make()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def until(cond, what):
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.005)

    async def scenario():
        edge = transport.UdpEdge(core, time.monotonic)
        edge._socks = [sock]
        edge.ticked_sampling = True
        edge.watch_overload(OverloadGuard(high=1000, low=500, window=3))
        await asyncio.sleep(0.1)
        assert samples == [(0, False)]  # quiet: no timer of the edge's own
        edge.sample_tick()
        assert samples == [(0, False)] * 2
        queue[0] = 300  # above high/4: the edge takes over
        edge.sample_tick()
        await until(lambda: len(samples) >= 6, "the edge's own samples")
        n = len(samples)
        edge.sample_tick()  # while the edge samples, the tick adds none
        assert len(samples) == n
        queue[0] = 5000
        await until(lambda: core.overloaded, "shedding after the window")
        first_high = samples.index((5000, False))
        # three samples in a row above the mark (the window), then it sheds
        assert samples[first_high:first_high + 4] == [(5000, False)] * 3 + [(5000, True)] * (len(samples) > first_high + 3)
        queue[0] = 0
        await until(lambda: not core.overloaded, "back to normal")
        n = len(samples)
        await asyncio.sleep(0.1)
        assert len(samples) == n  # quiet again: the tick's turn
        edge.sample_tick()
        assert len(samples) == n + 1 and not core.overloaded
        edge.close()

    try:
        uvloop.run(scenario())
    finally:
        sock.close()


def test_a_refused_invite_retransmitted_is_answered_503_again_and_counted_again():
    """The refusal adds nothing to the call tables (a flood of new INVITEs must not grow them), so
    an INVITE retransmitted because its 503 was late or lost is refused again, with the same 503,
    and the counter counts both: it counts 503s sent, which is what its help text and the README say (a
    bench at 2x capacity counted 52 more than its caller received)."""
    core = make()
    core.overloaded = True
    req = invite(call_id=b"again-1", branch=b"z9hG4bK-again-1")
    first = core.receive_datagram(req, GATEWAY, T0)
    second = core.receive_datagram(req, GATEWAY, T0 + 0.5)
    assert parse(first[0][0]).status == parse(second[0][0]).status == 503
    assert first[0][0] == second[0][0] and first[0][1] == second[0][1] == GATEWAY
    assert core.stats.overload_rejected == 2 and b"again-1" not in core.tracker.calls


@pytest.mark.parametrize("fast", [True, False])
def test_an_invite_refused_and_retransmitted_after_the_shedding_stopped_is_refused_again(fast):
    """Under a CPU limit the guard sheds and admits in turns a fraction of a second long, and an
    INVITE can wait in the queue past Timer A: its copy then arrives after the original was
    refused. Forwarded once the shedding had stopped, the copy made the callee ring for a call
    whose caller already had its 503 (and ACKed it). The transaction has its final answer
    (RFC 3261 §17.2.1): the copy gets the same 503 again. A retry of the call (another CSeq)
    and other calls are admitted."""
    core = make()
    core.fast_refusals = fast
    req = invite(call_id=b"ghost-1", branch=b"z9hG4bK-ghost-1")
    core.overloaded = True
    first = core.receive_datagram(req, GATEWAY, T0)
    core.overloaded = False
    again = core.receive_datagram(req, GATEWAY, T0 + 0.5)
    assert [parse(o).status for o, _ in first + again] == [503, 503]
    assert again == first and not forwarded(again)
    assert core.stats.overload_rejected == 2 and b"ghost-1" not in core.tracker.calls
    # its ACK is absorbed as the first one's would be
    tag = parse(again[0][0]).get(b"to").split(b"tag=")[1]
    ack = invite(method=b"ACK", call_id=b"ghost-1", branch=b"z9hG4bK-ghost-1", to_tag=tag, body=b"")
    assert core.receive_datagram(ack, GATEWAY, T0 + 0.51) == []
    retry = invite(call_id=b"ghost-1", branch=b"z9hG4bK-ghost-2", cseq=2)
    assert [a for _, a in forwarded(core.receive_datagram(retry, GATEWAY, T0 + 5))] == [SIGNALING]
    other = invite(call_id=b"ghost-2", branch=b"z9hG4bK-ghost-3")
    assert [a for _, a in forwarded(core.receive_datagram(other, GATEWAY, T0 + 5.1))] == [SIGNALING]


def test_refused_invites_are_remembered_within_bounds_and_for_a_while():
    """The memory of refusals cannot grow with a flood (two generations of at most _REFUSED_MAX
    Call-ID hashes each), and forgets after Timer B's span twice over without a refusal."""
    from sipwatch import core as core_module
    core = make()
    cap = core_module._REFUSED_MAX
    for i in range(cap * 3 + 7):
        core._refused(T0 + i * 1e-6, b"flood-%d" % i, 1)
    assert len(core._refused_invites) + len(core._refused_before) <= 2 * cap
    last = cap * 3 + 6
    assert core._was_refused(b"flood-%d" % last, 1, T0 + 1)
    assert not core._was_refused(b"flood-%d" % last, 2, T0 + 1)  # (another CSeq: a new request)
    assert not core._was_refused(b"flood-0", 1, T0 + 1)  # (two generations ago: gone)
    later = T0 + 2 * core_module._REFUSED_SPAN + 2
    assert not core._was_refused(b"flood-%d" % last, 1, later)
    assert not core._refused_invites and not core._refused_before
    req = invite(call_id=b"flood-%d" % last, branch=b"z9hG4bK-late")
    assert [a for _, a in forwarded(core.receive_datagram(req, GATEWAY, later))] == [SIGNALING]


def test_the_refusal_memory_does_not_grow_with_the_call_ids_it_holds():
    """An entry's size must not follow the datagram's: a flood of refused INVITEs with 60-KB
    Call-IDs would otherwise hold 2 x _REFUSED_MAX x 60 KB (about 4 GB)."""
    import tracemalloc
    core = make()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            core._refused(T0 + i * 1e-6, b"%d-" % i + b"x" * 60_000, 1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2000 * 1000  # (Call-IDs kept would be 120 MB)
    assert core._was_refused(b"1999-" + b"x" * 60_000, 1, T0 + 1)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("state", ["overloaded", "draining"])
def test_sip_signalings_own_new_dialogs_are_never_refused(state, fast):
    """Shedding and draining turn away the gateway side's new dialogs (the load entering). A new
    INVITE from sip-signaling is its own (a B2BUA's second leg of a call admitted before, its
    outbound calls): refused, the admitted call failed (a drain then ran to its timeout, the
    first leg never answered)."""
    core = make()
    core.fast_refusals = fast
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))  # leg A, admitted
    setattr(core, state, True)
    leg_b = (b"INVITE sip:+15557654321@10.0.0.1:5070 SIP/2.0\r\n"
             b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-legb-1\r\nMax-Forwards: 70\r\n"
             b"From: <sip:+15551234567@10.0.0.3>;tag=b2b-1\r\nTo: <sip:+15557654321@10.0.0.1>\r\n"
             b"Call-ID: leg-b@sig\r\nCSeq: 1 INVITE\r\nContact: <sip:b2b@10.0.0.3:5080>\r\n"
             b"Content-Length: 0\r\n\r\n")
    out = core.receive_datagram(leg_b, SIGNALING, T0 + 0.1)
    assert [d for _, d in out] == [GATEWAY] and out[0][0].startswith(b"INVITE ")
    assert core.stats.overload_rejected == 0 and core.stats.drain_rejected == 0
    # the gateway side's new INVITE is still refused
    out = core.receive_datagram(invite(call_id=b"new-9", branch=b"z9hG4bK-new-9"), GATEWAY, T0 + 0.2)
    assert out[0][0].startswith(b"SIP/2.0 503 ") and out[0][1] == GATEWAY

"""The UDP pump's own refusals (``refuse_here`` in sipwatch/_udppump.c over ``refuse_raw`` in
sipwatch/_sipscan.c) against the core's call they stand in for.

Past capacity each refused call costs a new INVITE answered 503 + Retry-After and the ACK of
that 503; the pump handles the plainest of them on its receive buffer, without the Python
objects the core's call needs. A twin core with the same key gets every datagram through its
own ``receive_datagram``: what a peer receives from the pump must be what the twin returns for
that peer, and after every datagram the two cores' state must be equal (counters, tables, the
window in which ACKs of refusals are looked for aside: it holds the clock's reading). The pump
is read by hand after each send (loopback delivers during the sender's call), so no event loop
runs; ``refused_here`` tells which datagrams the pump handled itself.
"""
from __future__ import annotations

import os
import random
import re
import socket
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sipwatch import core as core_module, transport
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.stats import ACK, FROM_GATEWAY, INVITE, Stats
from sipwatch.transport import epoch_clock

from test_refusal_fast import SDP, _join as join, _lines, _tag as tag_of
from test_response_fast import SECRET, mutations, snapshot

pytestmark = pytest.mark.skipif(transport._udppump is None or core_module._c_refusal is None,
                                reason="the C extensions are not built (or SIPWATCH_NO_C=1)")



# the receive buffer each socket asks for: a batch of 40 datagrams of up to 64 KB (the kernel
# charges ~66 KB for one) must fit, or the kernel drops some before the pump reads them
RCVBUF = 4 << 20
# what the kernel charges a datagram beyond its payload, at most (2304 bytes measured for 700)
CHARGE = 4096


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # (capped at net.core.rmem_max)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def _received(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            return got


class Rig:
    """Core ``a`` behind a pump on a loopback socket, its twin ``b``, a gateway and an upstream peer."""

    def __init__(self, overloaded: bool = True, draining: bool = False):
        self.listen, self.gw, self.up = _socket(), _socket(), _socket()
        self.addr, self.gw_addr, self.up_addr = (s.getsockname() for s in (self.listen, self.gw, self.up))
        self.a, self.b = (ProxyCore(CoreConfig(advertise=self.addr, upstream=self.up_addr, secret=SECRET),
                                    Stats(ring_size=1024), randbits=random.Random(7).getrandbits) for _ in range(2))
        for c in (self.a, self.b):
            c.overloaded, c.draining = overloaded, draining
        self.errors: list = []
        self.clock = epoch_clock()
        self.pump = self.new_pump(self._receive)

    def new_pump(self, receive):
        """A pump over the listen socket that calls ``receive`` for what it leaves to the core."""
        return transport._udppump.Pump(
            listen_fd=self.listen.fileno(), upstream_fd=-1, upstream=self.up_addr, receive=receive,
            core=self.a, edge=SimpleNamespace(wiretap=None, tap_failed=self.errors.append), dispatch=self._dispatch,
            send_failed=self.errors.append, on_error=self.errors.append, clock=self.clock, settle=self.a.settle,
            refusals=self.a.refusal_params())

    def _receive(self, data, src, now):
        self.now = now  # (the twin gets the same reading: the tables hold it)
        return self.a.receive_datagram(data, src, now)

    def _dispatch(self, data, src, now, out) -> None:
        for payload, dest in out:  # (what route() leaves to Python: here only sent on)
            self.listen.sendto(payload, dest)

    def feed(self, data: bytes) -> list:
        """``data`` from the gateway through the pump and through the twin; the twin's output,
        after checking that each peer received what the twin sends it and the states agree."""
        if len(data) > 65507:
            return []  # (no UDP datagram carries it: the mutations make some)
        before, self.now = self.pump.refused_here, None
        self.gw.sendto(data, self.addr)
        self.pump.read_listen()
        self.handled_here = self.pump.refused_here - before
        assert (self.now is None) == (self.handled_here == 1)
        out = self.b.receive_datagram(data, self.gw_addr, self.now if self.now is not None else self.clock())
        self.b.settle()
        for peer, addr in ((self.gw, self.gw_addr), (self.up, self.up_addr)):
            want = [p for p, d in out if d == addr]
            got = _received(peer)
            if want and b"\r\nVia: SIP/2.0/UDP " + b"%s:%d" % (self.addr[0].encode(), self.addr[1]) in want[0]:
                got = [_branchless(g) for g in got]  # (a forwarded request: its branch differs by design)
                want = [_branchless(w) for w in want]
            assert got == want, f"{addr} received {got!r}, the core sends {want!r} for {data[:300]!r}"
        assert not self.errors, self.errors
        assert self.state(self.a) == self.state(self.b), f"state differs after {data[:300]!r}"
        return out

    @staticmethod
    def state(core: ProxyCore):
        until, core._refusal_acks_until = core._refusal_acks_until, 0.0
        try:
            return snapshot((core.stats, core.tracker, core.gateway_seen, core.gateway_proven, core.handshake_only,
                             core.proven_parties, core.out_tcp, core.last_internal_error))
        finally:
            core._refusal_acks_until = until

    def close(self) -> None:
        self.pump.close()
        for s in (self.listen, self.gw, self.up):
            s.close()


def _branchless(msg: bytes) -> bytes:
    return re.sub(rb"branch=z9hG4bK[^;,\r]*", b"branch=", msg)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def lines(rig: Rig, n: int, method: bytes = b"INVITE", to_tag: bytes | None = None,
          via: bytes | None = None) -> list[bytes]:
    """test_refusal_fast's request, its Via naming the rig's gateway (or ``via``)."""
    host, port = rig.gw_addr
    ls = _lines(n, method, to_tag)
    ls[1] = b"Via: " + (via or b"SIP/2.0/UDP %s:%d;branch=z9hG4bK-%d-1;rport" % (host.encode(), port, n))
    return ls


def refuse_and_ack(rig: Rig, n: int, via: bytes | None = None) -> tuple[int, int]:
    """A new INVITE and the ACK of its 503: how many of the two the pump handled itself."""
    out = rig.feed(join(lines(rig, n, via=via), SDP))
    assert len(out) == 1 and out[0][0].startswith(b"SIP/2.0 503 ")
    first = rig.handled_here
    rig.feed(join(lines(rig, n, b"ACK", tag_of(out[0][0]), via=via)))
    return first, rig.handled_here


def test_plain_refusals_and_their_acks_are_handled_by_the_pump(rig):
    port = rig.gw_addr[1]
    for n, via in enumerate([
            None,  # rport, the Via naming the source: the port filled in, no received=
            b"SIP/2.0/UDP 127.0.0.3:%d;branch=z9hG4bK-x;rport" % port,  # another address: received=
            b"SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-x" % port,  # no rport: to the Via's port
            b"SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-x",  # no port either: to 5060 (nobody there)
            b"SIP/2.0/UDP 127.0.0.1:%d;RPort;branch=z9hG4bK-x;x-a=1;lr" % port,  # rport in another case
            b"SIP/2.0/UDP 127.0.0.1:0%d;branch=z9hG4bK-x;rport" % port if port < 10000 else None]):
        assert refuse_and_ack(rig, n, via) == (1, 1), via
    s = rig.a.stats
    assert s.overload_rejected == 6 and s.requests[INVITE * 2 + FROM_GATEWAY] == 6
    assert s.requests[ACK * 2 + FROM_GATEWAY] == 6 and rig.pump.refused_here == 12


@pytest.mark.parametrize("via", [
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;branch=z9hG4bK-x;rport;received=10.9.8.7",  # forged received
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;branch=z9hG4bK-x;rport=1234",  # forged rport
    b"SIP/2.0/UDP gw.example:%(port)d;branch=z9hG4bK-x;rport",  # a name
    b"SIP/2.0/UDP [::1]:%(port)d;branch=z9hG4bK-x;rport",  # IPv6
    b"SIP/2.0/UDP 127.0.0.01:%(port)d;branch=z9hG4bK-x;rport",  # not ipaddress's spelling
    b"SIP/2.0/udp 127.0.0.1:%(port)d;branch=z9hG4bK-x;rport",  # transport in lower case
    b"SIP/2.0/UDP  127.0.0.1:%(port)d;branch=z9hG4bK-x;rport",  # spaces
    b"SIP/2.0/UDP 127.0.0.1:%(port)d ;branch=z9hG4bK-x;rport",
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;branch=z9hG4bK-x;rport;rport",  # rport twice
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;branch=;rport",  # an empty value
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;;rport",  # an empty parameter
    b"SIP/2.0/UDP 127.0.0.1:99999;branch=z9hG4bK-x",  # no such port
    b"SIP/2.0/UDP 127.0.0.1:%(port)d;branch=z9hG4bK-x\x01;rport",  # a control byte
])
def test_other_vias_are_left_to_the_core(rig, via):
    via = via % {b"port": rig.gw_addr[1]}
    rig.feed(join(lines(rig, 1, via=via), SDP))
    assert rig.handled_here == 0 and rig.pump.refused_here == 0


def test_what_the_core_decides_otherwise_is_left_to_it(rig):
    # an admitted call's INVITE again (a retransmission): forwarded by the core, not refused
    rig.a.overloaded = rig.b.overloaded = False
    invite = join(lines(rig, 1), SDP)
    assert rig.feed(invite)[0][1] == rig.up_addr
    rig.a.overloaded = rig.b.overloaded = True
    assert rig.feed(invite)[0][1] == rig.up_addr and rig.handled_here == 0
    # an ACK before any refusal, and one with another tag after one: the core's full path
    rig.feed(join(lines(rig, 2, b"ACK", b"sw0123456789abcdef")))
    assert rig.handled_here == 0
    assert refuse_and_ack(rig, 3) == (1, 1)
    rig.feed(join(lines(rig, 3, b"ACK", b"sw0123456789abcdef")))
    assert rig.handled_here == 0
    # the fast path switched off: nothing here
    rig.a.fast_refusals = rig.b.fast_refusals = False
    assert refuse_and_ack(rig, 4) == (0, 0)
    rig.a.fast_refusals = rig.b.fast_refusals = True
    # a new key: the core rekeys on its call, then the pump goes on with the new one
    rig.a.key = rig.b.key = b"n" * 32
    assert refuse_and_ack(rig, 5) == (0, 1)
    assert refuse_and_ack(rig, 6) == (1, 1)
    # no longer overloaded: forwarded
    rig.a.overloaded = rig.b.overloaded = False
    assert rig.feed(join(lines(rig, 7), SDP))[0][1] == rig.up_addr and rig.handled_here == 0


def test_the_503s_of_one_read_leave_together_in_order(rig):
    """The pump sends the 503s of one recvmmsg batch with one sendmmsg at its end: each caller
    still gets exactly the core's 503, in the order of the INVITEs, across two batches."""
    invites = [join(lines(rig, n), SDP) for n in range(40)]  # (a batch is 32)
    for d in invites:
        rig.gw.sendto(d, rig.addr)
    rig.pump.read_listen()
    assert rig.pump.refused_here == 32 and _received(rig.gw) != []
    rig.pump.read_listen()
    assert rig.pump.refused_here == 40 and not rig.errors
    rig.gw.sendto(invites[0], rig.addr)  # (one more read: everything has been received)
    rig.pump.read_listen()
    want = [rig.b.receive_datagram(d, rig.gw_addr, rig.clock())[0][0] for d in invites[32:] + invites[:1]]
    assert _received(rig.gw) == want
    assert rig.a.stats.overload_rejected == 41


def test_503s_queued_before_the_pump_is_closed_from_a_callback_still_leave(rig):
    """A stop from the core's call ends the batch (the pump is closed under it): the 503s the
    pump queued before that are sent by the close, the datagrams after it are not read."""
    receive = rig._receive

    def closing(data, src, now):
        rig.pump.close()
        return receive(data, src, now)
    rig._receive = closing
    rig.pump.close()
    rig.pump = rig.new_pump(closing)
    first, options, last = join(lines(rig, 1), SDP), join(lines(rig, 2, b"OPTIONS")), join(lines(rig, 3), SDP)
    for d in (first, options, last):
        rig.gw.sendto(d, rig.addr)
    rig.pump.read_listen()
    got = _received(rig.gw)
    assert len(got) == 1 and got[0] == rig.b.receive_datagram(first, rig.gw_addr, rig.clock())[0][0]
    assert rig.a.stats.overload_rejected == 1 and not rig.errors


@settings(max_examples=int(os.environ.get("REFUSAL_PUMP_EXAMPLES", "150")) // 3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_read_of_mixed_datagrams_matches_the_core(rig, data):
    """Up to 40 datagrams queued before one read: plain INVITEs (the pump's), mutated ones, ACKs
    of their 503s and OPTIONS (the core's). The pump's 503s leave at the end of the batch, the
    core's output as it comes, so each peer must receive what the twin sends it (in any order:
    they are different transactions) and the two cores' state must agree. A mutated Via may name
    another address (no rport, a host and no port: port 5060); what goes there neither peer sees."""
    for peer in (rig.gw, rig.up):  # (an example that failed left its datagrams: not this one's)
        _received(peer)
    seen = []
    receive = rig._receive

    def recording(d, src, now):
        seen.append((d, now))
        return receive(d, src, now)
    rig.pump.close()
    rig.pump = rig.new_pump(recording)
    scratch = ProxyCore(CoreConfig(advertise=rig.addr, upstream=rig.up_addr, secret=SECRET), Stats(ring_size=64),
                        randbits=random.Random(7).getrandbits)
    scratch.overloaded = True
    batch = []
    for _ in range(data.draw(st.integers(2, 40))):
        n = data.draw(st.integers(0, 10**6))
        kind = data.draw(st.sampled_from(["invite", "mutated", "ack", "options"]))
        invite = join(lines(rig, n), SDP)
        if kind == "invite":
            batch.append(invite)
        elif kind == "mutated":
            batch.append(data.draw(mutations(lines(rig, n), SDP))[:65507])
        elif kind == "ack":
            batch += [invite, join(lines(rig, n, b"ACK", tag_of(scratch.receive_datagram(invite, rig.gw_addr,
                                                                                        rig.clock())[0][0])))]
        else:
            batch.append(join(lines(rig, n, b"OPTIONS")))
    batch = _what_fits(rig, batch[:40])
    for d in batch:
        rig.gw.sendto(d, rig.addr)
    before = rig.pump.refused_here
    rig.pump.read_listen()
    rig.pump.read_listen()
    assert not rig.errors, rig.errors
    to_core = iter(seen)
    pending = next(to_core, None)
    want: dict = {rig.gw_addr: [], rig.up_addr: []}
    for d in batch:
        if pending is not None and pending[0] == d:
            now, pending = pending[1], next(to_core, None)
        else:
            now = rig.clock()  # (one the pump handled: only the ACK window holds its time)
        for payload, dest in rig.b.receive_datagram(d, rig.gw_addr, now):
            want.setdefault(dest, []).append(payload)
        rig.b.settle()
    assert pending is None and len(seen) + rig.pump.refused_here - before == len(batch)
    for peer, addr in ((rig.gw, rig.gw_addr), (rig.up, rig.up_addr)):
        assert sorted(map(_branchless, _received(peer))) == sorted(map(_branchless, want[addr]))
    assert rig.state(rig.a) == rig.state(rig.b)


def _what_fits(rig: Rig, batch: list[bytes]) -> list[bytes]:
    """The head of ``batch`` that every socket of the rig holds at once, queued before one read
    (RCVBUF where net.core.rmem_max allows it): two datagrams of 64 KB and 36 small ones had
    overflowed the default 208 KB, and the kernel's drop read as a datagram the pump had lost."""
    room = min(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in (rig.listen, rig.gw, rig.up))
    used = 0
    for i, d in enumerate(batch):
        used += len(d) + CHARGE
        if used > room:
            return batch[:i]
    return batch


def test_a_batch_that_fits_is_all_still_queued_when_the_pump_reads():
    """What :func:`_what_fits` keeps of 40 datagrams, the largest UDP carries among them, is all
    in the listen socket when it is read (the bound on what the kernel charges holds), and here,
    with the buffer asked for, that is all of it."""
    rig = Rig()
    try:
        batch = _what_fits(rig, [b"x" * 65507] * 2 + [b"y" * 700] * 38)
        for d in batch:
            rig.gw.sendto(d, rig.addr)
        assert len(_received(rig.listen)) == len(batch)
        if rig.listen.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * RCVBUF:  # (granted in full)
            assert len(batch) == 40
    finally:
        rig.close()


def test_draining_refusals_are_counted_as_such():
    rig = Rig(overloaded=False, draining=True)
    try:
        assert refuse_and_ack(rig, 1) == (1, 1)
        assert rig.a.stats.drain_rejected == 1 and rig.a.stats.overload_rejected == 0
    finally:
        rig.close()


def test_a_503_larger_than_its_invite_is_left_to_the_core(rig):
    """(No amplification: the core counts it and sends nothing; see ProxyCore._reply.)"""
    small = (b"INVITE sip:a@b SIP/2.0\r\nv:SIP/2.0/UDP 127.0.0.3;branch=z9hG4bK1\r\nf:<sip:a@b>\r\n"
             b"t:<sip:b@c>\r\ni:1\r\nCSeq:1 INVITE\r\n\r\n")
    assert rig.feed(small) == [] and rig.handled_here == 0 and rig.a.stats.overload_rejected == 1


@settings(max_examples=int(os.environ.get("REFUSAL_PUMP_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.booleans(), st.data())
def test_the_pump_matches_the_core_on_mutated_requests(rig, rport, true_tag, data):
    n = data.draw(st.integers(0, 10**6))
    via = b"SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-%d%s" % (rig.gw_addr[1], n, b";rport" if rport else b"")
    out = rig.feed(data.draw(mutations(lines(rig, n, via=via), SDP)))
    tag = tag_of(out[0][0]) if out and b";tag=sw" in out[0][0] else b"sw0"
    ack = lines(rig, n, b"ACK", tag if true_tag else data.draw(st.sampled_from([tag + b"0", tag.upper()])), via=via)
    rig.feed(data.draw(mutations(ack, b"")))
    rig.feed(join(ack))


def test_an_invite_from_sip_signaling_is_left_to_the_core(rig):
    """The pump refused the plainest new INVITEs from anyone; sip-signaling's own (a B2BUA's
    second leg) is never refused (ProxyCore._request): it goes to the core. Its Via names a
    port other than its source, so the 503 would not have gone to the upstream address."""
    host, _ = rig.up_addr
    ls = _lines(42, b"INVITE", None)
    ls[1] = b"Via: SIP/2.0/UDP %s:5999;branch=z9hG4bK-legb-42" % host.encode()
    got = []
    rig.pump.close()
    rig.pump = rig.new_pump(lambda d, s, n: got.append(s) or rig.a.receive_datagram(d, s, n))
    rig.up.sendto(join(ls, SDP), rig.addr)
    rig.pump.read_listen()
    assert rig.pump.refused_here == 0 and got == [rig.up_addr]
    assert rig.a.stats.overload_rejected == 0

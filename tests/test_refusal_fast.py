"""The refusal fast path (``ProxyCore._fast_refusal``, the C ``_sipscan.refusal``) against the full
path it skips: for every input, the same datagrams out, the same counters and drop reasons, the
same state.

Past capacity the proxy answers new INVITEs 503 + Retry-After and absorbs the ACKs of those
503s; every refused call costs those two messages. Two cores with the same key get the same
INVITEs and ACKs, written the ways peers and attackers write them (the response tests'
mutations: compact and odd-case names, folding, duplicates, missing headers, Content-Length
variants, hostile bytes, random bytes), overloaded, draining or neither, from sources with and
without rport: the fast path on in one, off in the other. The fixed cases also check the 503
against the request as written.
"""
from __future__ import annotations

import os
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sipwatch import core as core_module, sipmsg
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.stats import ACK, FROM_GATEWAY, INVITE, Stats

from leakcheck import kept_by
from test_response_fast import GATEWAY, SECRET, SIDECAR, UPSTREAM, mutations, state

pytestmark = pytest.mark.skipif(core_module._c_refusal is None, reason="the C extension is not built (or SIPWATCH_NO_C=1)")

SDP = b"v=0\r\no=gw 1 1 IN IP4 127.0.0.3\r\ns=-\r\nc=IN IP4 127.0.0.3\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def _lines(n: int, method: bytes = b"INVITE", to_tag: bytes | None = None, rport: bool = True) -> list[bytes]:
    return [b"%s sip:+4930999888@127.0.0.1:5070 SIP/2.0" % method,
            b"Via: SIP/2.0/UDP 127.0.0.3:5062;branch=z9hG4bK-%d-1%s" % (n, b";rport" if rport else b""),
            b"From: \"Caller\" <sip:+4930123456@127.0.0.3:5062>;tag=%dA" % n,
            b"To: <sip:+4930999888@127.0.0.1:5070>" + (b";tag=" + to_tag if to_tag else b""),
            b"Call-ID: %d-x@127.0.0.3" % n,
            b"CSeq: 1 %s" % method,
            b"Contact: <sip:gw@127.0.0.3:5062>",
            b"Max-Forwards: 70"]


def _join(lines: list[bytes], body: bytes = b"") -> bytes:
    return b"\r\n".join(lines + [b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


def _pair(overloaded: bool = True, draining: bool = False) -> tuple[ProxyCore, ProxyCore]:
    cores = []
    for fast in (True, False):
        c = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=UPSTREAM, secret=SECRET), Stats(ring_size=1024),
                      randbits=random.Random(7).getrandbits)
        c.fast_refusals = fast
        c.overloaded, c.draining = overloaded, draining
        cores.append(c)
    return cores[0], cores[1]


def feed(pair, data: bytes, src, now: float, tcp: bool = False) -> list:
    """``data`` through both cores (over a TCP connection from ``src`` with ``tcp``): the same
    output, the same transport for it, the same alias learnt, the same state."""
    fast, full = pair
    fast.out_tcp = full.out_tcp = False  # (as the TCP edge leaves it after each message)
    if tcp:
        out = fast.receive_stream(data, src, now)
        assert out == full.receive_stream(data, src, now), f"outputs differ for {data[:400]!r}"
    else:
        out = fast.receive_datagram(data, src, now)
        assert out == full.receive_datagram(data, src, now), f"outputs differ for {data[:400]!r}"
    assert fast.tcp_alias == full.tcp_alias, data[:400]
    assert state(fast) == state(full), f"state differs after {data[:400]!r}"
    return out


def _args(core: ProxyCore, data) -> tuple:
    return (data, sipmsg._NAME_CACHE, sipmsg.MAX_HEADER_LINES, sipmsg.MAX_CONTENT_LENGTH_DIGITS, sipmsg.MAX_MESSAGE,
            core._mac_state, core_module._REFUSAL_STATUS, core_module._RETRY_AFTER_LINE)


def _fast_taken(core: ProxyCore, data: bytes) -> bool:
    return core_module._c_refusal(*_args(core, data)) is not None


def _tag(response: bytes) -> bytes:
    return re.search(rb"\r\n(?i:to|t)[ \t]*:[^\r]*;tag=(sw[0-9a-f]+)", response).group(1)


# -- fixed cases ----------------------------------------------------------------------------------
def test_refused_invite_and_its_ack_take_the_fast_path():
    pair = _pair()
    lines = _lines(1)
    invite = _join(lines, SDP)
    assert _fast_taken(pair[0], invite)
    out = feed(pair, invite, GATEWAY, 1000.0)
    assert len(out) == 1 and out[0][1] == GATEWAY
    resp = out[0][0]
    # the 503 as RFC 3261 §8.2.6.2 builds it from the request: its Via (received/rport from the real
    # source), From, To with our tag, Call-ID, CSeq; then Retry-After
    assert resp.split(b"\r\n") == [
        b"SIP/2.0 503 Service Unavailable",
        b"Via: SIP/2.0/UDP 127.0.0.3:5062;branch=z9hG4bK-1-1;rport=5062",
        lines[2], lines[3] + b";tag=" + _tag(resp), lines[4], lines[5],
        b"Retry-After: 5", b"Content-Length: 0", b"", b""]
    ack = _join(_lines(1, b"ACK", _tag(resp)))
    assert _fast_taken(pair[0], ack)
    assert feed(pair, ack, GATEWAY, 1000.1) == []
    stats = pair[0].stats
    assert stats.overload_rejected == 1 and stats.requests[INVITE * 2 + FROM_GATEWAY] == 1
    assert stats.requests[ACK * 2 + FROM_GATEWAY] == 1


@pytest.mark.pure_python
def test_acks_are_looked_for_on_the_fast_path_only_after_a_refusal(monkeypatch):
    """Scanning every ACK for an "sw" tag cost ~0.7 us in process: the fast path looks for the
    ACK of a refusal only within 40 s of one (Timer H); later it takes the full path, which
    absorbs it just the same."""
    seen = []
    real = core_module._c_refusal
    monkeypatch.setattr(core_module, "_c_refusal", lambda *a: seen.append(a[0][:3]) or real(*a))
    pair = _pair()
    ack0 = _join(_lines(11, b"ACK", b"sw0123456789ab"))
    feed(pair, ack0, GATEWAY, 999.0)  # (no refusal yet: not looked at)
    assert seen == []
    resp = feed(pair, _join(_lines(11), SDP), GATEWAY, 1000.0)[0][0]
    ack = _join(_lines(11, b"ACK", _tag(resp)))
    assert feed(pair, ack, GATEWAY, 1000.1) == [] and seen == [b"INV", b"ACK"]
    assert feed(pair, ack, GATEWAY, 1041.0) == [] and len(seen) == 2
    assert pair[0].stats.requests[ACK * 2 + FROM_GATEWAY] == 3


def _over_tcp(pair) -> None:
    conn = ("127.0.0.3", 40001)
    lines = _lines(12, rport=False)
    lines[1] = lines[1].replace(b"/UDP ", b"/TCP ")
    out = feed(pair, _join(lines, SDP), conn, 1000.0, tcp=True)
    assert len(out) == 1 and out[0][1] == conn and pair[0].out_tcp
    resp = out[0][0]
    assert resp.split(b"\r\n")[1] == b"Via: SIP/2.0/TCP 127.0.0.3:5062;branch=z9hG4bK-12-1;rport=40001"
    assert pair[0].tcp_alias == ("127.0.0.3", 5062)
    ack = _join([lines[0].replace(b"INVITE", b"ACK", 1), lines[1]] + _lines(12, b"ACK", _tag(resp))[2:])
    assert feed(pair, ack, conn, 1000.1, tcp=True) == []
    stats = pair[0].stats
    assert stats.overload_rejected == 1 and stats.requests_tcp[INVITE * 2 + FROM_GATEWAY] == 1
    assert stats.requests_tcp[ACK * 2 + FROM_GATEWAY] == 1


def test_over_tcp_the_refusal_takes_the_connection():
    """Over TCP too (a connection's backlog standing sheds: see sipwatch/tcp.py): the 503 goes
    back on the connection (its peer address, ``out_tcp``), its Via gets ``rport`` from the
    connection, the sender's sent-by is learnt as an alias, and the ACK ends at the proxy, on
    the fast path as on the full one."""
    _over_tcp(_pair())


@pytest.mark.pure_python
def test_over_tcp_the_refusal_takes_the_fast_path(monkeypatch):
    """Only UDP took the fast path before: past capacity over TCP each refused call was parsed
    whole (the compiled core binds the C function: this looks in the pure build only)."""
    taken = []
    real = core_module._c_refusal
    monkeypatch.setattr(core_module, "_c_refusal", lambda *a: taken.append(a[0][:3]) or real(*a))
    _over_tcp(_pair())
    assert taken == [b"INV", b"ACK"]  # (the full core never calls it)


def test_over_tcp_a_via_the_scan_takes_but_the_parser_refuses_counts_alike():
    """The TCP counter was bumped after the Via's parse on the fast path, before it on the full
    path: a Via port out of range (the C scan takes it, parse_via raises) counted differently."""
    pair = _pair()
    lines = _lines(13)
    lines[1] = b"Via: SIP/2.0/TCP 127.0.0.3:99999;branch=z9hG4bK-13-1"
    feed(pair, _join(lines, SDP), ("127.0.0.3", 40002), 1000.0, tcp=True)
    assert pair[0].stats.requests_tcp[INVITE * 2 + FROM_GATEWAY] == 1


def test_order_compact_names_and_a_source_without_rport():
    """The copied lines keep their order and spelling, the Via line is rewritten; no rport: the
    503 goes to the Via's port on the source IP, with received= (the Via names another host)."""
    pair = _pair(overloaded=False, draining=True)
    lines = _lines(2, rport=False)
    lines = [lines[0], b"f: <sip:a@b>;tag=9", b"i: 2-x@127.0.0.3", b"v:SIP/2.0/UDP gw.example:5099;branch=z9hG4bKq",
             b"t: <sip:b@c>", b"CSeq:  7  INVITE", b"Max-Forwards: 70"]
    invite = _join(lines, SDP)
    assert _fast_taken(pair[0], invite)
    out = feed(pair, invite, ("127.0.0.3", 40000), 1000.0)
    resp = out[0][0]
    assert out[0][1] == ("127.0.0.3", 5099)
    assert resp.split(b"\r\n")[1:6] == [b"f: <sip:a@b>;tag=9", b"i: 2-x@127.0.0.3",
                                        b"Via: SIP/2.0/UDP gw.example:5099;branch=z9hG4bKq;received=127.0.0.3",
                                        b"t: <sip:b@c>;tag=" + _tag(resp), b"CSeq:  7  INVITE"]
    assert pair[0].stats.drain_rejected == 1 and pair[0].stats.overload_rejected == 0


def test_an_ack_with_a_forged_or_foreign_tag_takes_the_full_path():
    pair = _pair()
    resp = feed(pair, _join(_lines(3), SDP), GATEWAY, 1000.0)[0][0]
    tag = _tag(resp)
    for bad in (tag[:-1] + (b"0" if tag[-1:] != b"0" else b"1"), tag + b"0", tag[:-1], b"sw", b"swx"):
        ack = _join(_lines(3, b"ACK", bad))
        assert not _fast_taken(pair[0], ack)
        feed(pair, ack, GATEWAY, 1000.1)
    other = _pair()  # another key: its MAC is not ours
    other[0].key = other[1].key = b"o" * 32
    ack = _join(_lines(3, b"ACK", tag))
    assert other[0]._fast_refusal(ack, GATEWAY, 1000.2) is None and not _fast_taken(other[0], ack)  # (rekeyed first)
    feed(other, ack, GATEWAY, 1000.2)


@pytest.mark.parametrize("edit", [
    lambda d: d.replace(b"Call-ID:", b"Call-ID: dup\r\nCall-ID:"),  # duplicate header
    lambda d: d.replace(b"CSeq: 1 INVITE", b"CSeq: 1 invite"),  # (the full path accepts it)
    lambda d: d.replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE"),  # not the request's method
    lambda d: d.replace(b";rport", b";rport, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx"),  # two Via values
    lambda d: d.replace(b"Via:", b"Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx\r\nVia:"),  # two Via lines
    lambda d: d.replace(b"Contact:", b"Contact: a\r\n b\r\nX:"),  # folding
    lambda d: d.replace(b"Content-Length: %d" % len(SDP), b"Content-Length: 1"),  # body cut to the length
    lambda d: d.replace(b"Content-Length: %d" % len(SDP), b"Content-Length: 900"),  # body shorter
    lambda d: d.replace(b"\r\n", b"\n"),  # bare LF
    lambda d: d.replace(b"To: <sip:+4930999888@127.0.0.1:5070>", b"To: <sip:x@y>;tag=1"),  # in dialog
    lambda d: d.replace(b"INVITE sip", b"INVITE  sip"),  # not a request line
    lambda d: d.replace(b"Call-ID: 4-x@127.0.0.3", b"Call-ID: "),  # empty Call-ID
    lambda d: d.replace(b"From:", b"X-From:"),  # no From
])
def test_unusual_shapes_are_left_to_the_full_path(edit):
    pair = _pair()
    data = edit(_join(_lines(4), SDP))
    assert pair[0]._fast_refusal(data, GATEWAY, 1000.0) is None  # (changes nothing: compared below)
    feed(pair, data, GATEWAY, 1000.0)


def test_a_refusal_larger_than_the_request_is_not_sent():
    """A spoofed source gains nothing by asking for a 503 (no amplification: see _reply)."""
    pair = _pair()
    lines = [b"INVITE sip:a@b SIP/2.0", b"v:SIP/2.0/UDP h;branch=z9hG4bK1", b"f:<sip:a@b>", b"t:<sip:b@c>",
             b"i:1", b"CSeq:1 INVITE"]
    invite = b"\r\n".join(lines) + b"\r\n\r\n"
    assert _fast_taken(pair[0], invite)
    assert feed(pair, invite, ("127.0.0.9", 5062), 1000.0) == []
    assert pair[0].stats.overload_rejected == 1


def test_no_refusal_unless_overloaded_or_draining():
    pair = _pair(overloaded=False)
    out = feed(pair, _join(_lines(5), SDP), GATEWAY, 1000.0)
    assert len(out) == 1 and out[0][1] == UPSTREAM  # forwarded
    assert pair[0]._fast_refusal(_join(_lines(6), SDP), GATEWAY, 1000.0) is None


# -- generated and mutated requests ---------------------------------------------------------------
@st.composite
def scenarios(draw):
    return (draw(st.sampled_from([(True, False), (False, True), (True, True), (False, False)])),  # overloaded, draining
            draw(st.booleans()),  # rport in the Via
            draw(st.sampled_from([GATEWAY, UPSTREAM, ("127.0.0.9", 5062), ("::1", 5062)])),  # the source
            draw(st.booleans()),  # the ACK carries the refusal's tag (else a mutated one)
            draw(st.booleans()),  # a body
            draw(st.booleans()))  # over a TCP connection (its Via then says TCP, or UDP as written)


@settings(max_examples=int(os.environ.get("REFUSAL_FAST_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios(), st.data())
def test_fast_path_matches_the_full_path(case, data):
    (overloaded, draining), rport, src, true_tag, with_body, tcp = case
    pair = _pair(overloaded, draining)
    body = SDP if with_body else b""
    lines = _lines(8, rport=rport)
    if tcp and data.draw(st.booleans()):
        lines[1] = lines[1].replace(b"/UDP ", b"/TCP ")
    invite = data.draw(mutations(lines, body))
    out = feed(pair, invite, src, 1000.0, tcp)
    clean = _pair(overloaded, draining)  # (the tag a clean INVITE gets, for the ACKs below)
    tag = _tag(clean[1].receive_datagram(_join(_lines(8, rport=rport), body), src, 1000.0)[0][0]) \
        if overloaded or draining else b"sw0"
    if out and b";tag=sw" in out[0][0]:
        tag = _tag(out[0][0])
    ack_lines = _lines(8, b"ACK", tag if true_tag else data.draw(st.sampled_from([tag, tag.upper(), b"sw" + tag])),
                       rport=rport)
    ack_lines[1] = lines[1].replace(b"-1", b"-2", 1) if tcp else ack_lines[1]
    feed(pair, data.draw(mutations(ack_lines, b"")), src, 1000.1, tcp)
    feed(pair, _join(ack_lines), src, 1000.2, tcp)


# -- the C function itself ------------------------------------------------------------------------
def test_refusal_refuses_bad_arguments():
    from sipwatch import _sipscan
    core = _pair()[0]
    args = _args(core, _join(_lines(9), SDP))
    with pytest.raises(TypeError):
        _sipscan.refusal(*args[:7])
    with pytest.raises(TypeError):
        _sipscan.refusal(args[0], list(args[1]), *args[2:])
    with pytest.raises(TypeError):
        _sipscan.refusal(*args[:2], "1000", *args[3:])
    with pytest.raises(TypeError):
        _sipscan.refusal(*args[:5], "state", *args[6:])
    with pytest.raises(ValueError):
        _sipscan.refusal(*args[:5], b"short", *args[6:])
    assert _sipscan.refusal(bytearray(args[0]), *args[1:]) is None  # (only bytes qualify)
    assert _sipscan.refusal(*args[:4], 100, *args[5:]) is None  # (larger than max_size)
    assert _sipscan.refusal(*args) is not None


def test_no_reference_or_memory_is_kept_by_the_refusal_call():
    from sipwatch import _sipscan
    core = _pair()[0]
    invite = _join(_lines(10), SDP)
    resp = core.receive_datagram(invite, GATEWAY, 1000.0)[0][0]
    ack = _join(_lines(10, b"ACK", _tag(resp)))
    odd = [invite.replace(b"CSeq: 1", b"CSeq: x"), invite.replace(b"Call-ID:", b"X-Unknown-Name: 1\r\nCall-ID:"),
           _join(_lines(10, b"ACK", b"sw0123")), b"INVITE sip:a SIP/2.0\r\n\r\n"]
    args = [_args(core, d) for d in [invite, ack, *odd]]
    assert _sipscan.refusal(*args[0]) is not None and _sipscan.refusal(*args[1]) is not None

    def calls():
        for a in args:
            _sipscan.refusal(*a)
    watched = [invite, ack, *odd, core._mac_state, core_module._REFUSAL_STATUS, core_module._RETRY_AFTER_LINE]
    refs, grown = kept_by(calls, watched, 2000)
    assert refs == [0] * len(watched)
    assert grown < 16_000, grown

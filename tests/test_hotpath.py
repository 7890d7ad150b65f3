"""The hot path's shortcuts give the same answers as the general code they skip."""
from __future__ import annotations

from sipwatch import sipmsg
from sipwatch.core import BRANCH_PREFIX, CoreConfig, ProxyCore
from sipwatch.sipmsg import parse, parse_via

SIDECAR = ("10.0.0.2", 5060)
SIGNALING = ("10.0.0.3", 5080)


def _msg(*headers: bytes) -> bytes:
    return b"\r\n".join((b"OPTIONS sip:x@10.0.0.3 SIP/2.0",) + headers) + b"\r\n\r\n"


def test_header_name_table_learns_spellings_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(sipmsg, "_NAME_CACHE", dict(sipmsg._NAME_CACHE))
    monkeypatch.setattr(sipmsg, "_NAME_CACHE_MAX", len(sipmsg._NAME_CACHE) + 2)
    data = _msg(b"VIA : SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1", b"X-A: 1", b"X-B: 2", b"x-c: 3",
                b"I: id", b"Via:SIP/2.0/UDP 10.0.0.9")
    first = parse(data)
    assert first.names == [b"via", b"x-a", b"x-b", b"x-c", b"call-id", b"via"]
    # learnt two, then forgot them to learn the next ones: never past the bound
    assert len(sipmsg._NAME_CACHE) <= sipmsg._NAME_CACHE_MAX
    assert sipmsg._NAME_CACHE.items() >= sipmsg._FIXED_NAMES.items()
    again = parse(data)  # now partly from the table: same names
    assert again.names == first.names and again.lines == first.lines


def test_made_up_names_cannot_keep_a_gateways_names_off_the_fast_path(monkeypatch):
    """The table stopped learning once full: two datagrams of 600 made-up names filled it for
    the life of the process, and a message with a name it did not hold (a carrier's own) never
    took the one-call header scan again. Now a full table forgets what it learnt."""
    if sipmsg._c_split is None:
        return  # (the pure-Python build has no C scan to fall off)
    monkeypatch.setattr(sipmsg, "_NAME_CACHE", dict(sipmsg._NAME_CACHE))
    junk = [_msg(*(b"X-Junk-%d-%d: v" % (k, i) for i in range(600))) for k in range(4)]
    ours = _msg(b"Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1", b"X-Gateway-Account: 42", b"X-Route-Set: a")
    for data in junk:
        parse(data)
        assert len(sipmsg._NAME_CACHE) <= sipmsg._NAME_CACHE_MAX
    parse(ours)  # learns its names
    assert sipmsg._c_split(ours, sipmsg._NAME_CACHE, sipmsg.MAX_HEADER_LINES) is not None


def test_lines_without_colon_or_folded_never_match_the_table():
    assert parse(_msg(b"Via: SIP/2.0/UDP a", b" ;received=1.2.3.4", b"To: <sip:b@c>")).names == [b"via", b"to"]
    for bad in (b"Via", b"CSeq 1 OPTIONS", b": x"):
        try:
            parse(_msg(bad))
        except sipmsg.SipParseError:
            continue
        raise AssertionError(bad)


def test_bare_lf_among_crlf_lines():
    m = parse(b"OPTIONS sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP a\nCall-ID: 1\r\n\r\n")
    assert m.lines == [b"Via: SIP/2.0/UDP a", b"Call-ID: 1"] and m.names == [b"via", b"call-id"]


def test_own_via_shortcut_agrees_with_parse_via():
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    branch = BRANCH_PREFIX + b"0123456789ab.ba9876543210"
    ours = b"SIP/2.0/UDP 10.0.0.2:5060;branch=" + branch + b";rport"
    assert core._own_branch(ours) == branch == parse_via(ours).branch
    for other in (ours + b";received=10.0.0.9", ours.replace(b";rport", b" ;rport"),
                  ours.replace(b"5060", b"5061"), ours.replace(b".ba98", b";ba98"),
                  b"SIP/2.0/UDP 10.0.0.2:5060;branch=" + BRANCH_PREFIX + b";rport"):
        assert core._own_branch(other) is None  # general path decides

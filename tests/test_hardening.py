"""Issue 8, in the core: what a hostile or broken peer sends must not crash, reflect, amplify or
be forwarded half-understood. Each test is one defect the first build had, driven through the
sans-IO core with the time passed in; what the core returns is checked against RFC 3261 rules,
not against the core's own helpers.
"""
from __future__ import annotations

import ipaddress

import pytest

from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.sipmsg import parse
from sipwatch.stats import ANSWERED, DROP_REASONS

from test_core import GATEWAY, SDP, SIDECAR, SIGNALING, T0, invite, response_to

VICTIM = ("10.9.9.9", 7777)


def make(**kw) -> ProxyCore:
    return ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, **kw))


def dropped(core: ProxyCore, reason: str) -> int:
    return core.stats.dropped[DROP_REASONS.index(reason)]


def forwarded(out) -> list:
    """Output datagrams that are not local responses (what went on towards a next hop)."""
    return [(d, a) for d, a in out if not d.startswith(b"SIP/2.0 ")]


def headers_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


# -- 1. bounded numbers ------------------------------------------------------------------
@pytest.mark.parametrize("cseq", [b"18446744073709551616", b"2147483648", b"99999999999999999999999"])
def test_cseq_out_of_range_is_not_forwarded_and_answered_400(cseq):
    core = make()
    req = invite().replace(b"CSeq: 1 INVITE", b"CSeq: " + cseq + b" INVITE")
    out = core.receive_datagram(req, GATEWAY, T0)
    assert not forwarded(out)
    assert len(out) == 1 and out[0][0].startswith(b"SIP/2.0 400 ") and out[0][1] == GATEWAY
    assert dropped(core, "out_of_range") == 1
    assert not core.tracker.calls  # nothing of it is kept to be logged later


def test_largest_valid_cseq_passes():
    core = make()
    out = core.receive_datagram(invite(cseq=(1 << 31) - 1), GATEWAY, T0)
    assert len(forwarded(out)) == 1


@pytest.mark.parametrize("mf", [b"256", b"99999999999999999999", b"-1", b"7a"])
def test_max_forwards_out_of_range_is_refused(mf):
    core = make()
    out = core.receive_datagram(invite(max_forwards=mf), GATEWAY, T0)
    assert not forwarded(out)


@pytest.mark.parametrize("port", [b"0", b"65536", b"106638", b"99999999999999999999"])
def test_via_port_out_of_range_is_refused(port):
    core = make()
    req = invite().replace(b"10.0.0.1:5070;branch", b"10.0.0.1:" + port + b";branch")
    assert not forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert dropped(core, "out_of_range") == 1


# -- 2. nothing half-understood is forwarded ----------------------------------------------
@pytest.mark.parametrize("bad, reason", [
    (b"NoColonHere", "malformed_header"),
    (b"Bad Name: x", "malformed_header"),
    (b"X-Nul: a\x00b", "control_bytes"),
    (b"X-Esc: a\x1bb", "control_bytes"),
    (b"X-Cr: a\rb", "control_bytes"),
    (b"Content-Length: 5", "bad_content_length"),
])
def test_malformed_header_sections_are_dropped_by_reason(bad, reason):
    core = make()
    req = invite(extra=bad)
    out = core.receive_datagram(req, GATEWAY, T0)
    assert not forwarded(out), out
    assert dropped(core, reason) == 1


@pytest.mark.parametrize("text", [b"caf\xe9", b"\xff\xfe\xc3\x28", b"M\xfcller \x80\x9f", b"\xe2\x82"])
def test_bytes_that_are_not_utf8_pass_unchanged_through_a_whole_call(text):
    """RFC 3261 §16.3 step 1: what the proxy does not read or rewrite (a Latin-1 display name from
    an older phone, a Subject, an extension header) stays as it came. Kamailio forwards such an
    INVITE; dropping it failed the call. Every message of the call passes, the header lines the
    proxy does not own byte for byte, and the call is counted answered."""
    def named(msg: bytes) -> bytes:  # the caller's display name in ``text``
        return msg.replace(b'From: "Alice"', b'From: "' + text + b'"')

    core = make()
    req = named(invite(extra=b"Subject: " + text + b"\r\nX-Name: " + text))
    out = forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert len(out) == 1 and out[0][1] == SIGNALING
    fwd = out[0][0]
    for line in (b'From: "' + text + b'" <sip:+15557654321@10.0.0.1>;tag=from-1', b"Subject: " + text,
                 b"X-Name: " + text):
        assert b"\r\n" + line + b"\r\n" in fwd
    for status in (100, 180, 200):
        back = core.receive_datagram(response_to(fwd, status), SIGNALING, T0 + 0.01 * status / 100)
        assert len(back) == 1 and back[0][1] == GATEWAY and b'"' + text + b'"' in back[0][0]
    ack = named(invite(method=b"ACK", branch=b"z9hG4bK-gw-2", to_tag=b"uas-1", body=b""))
    assert len(forwarded(core.receive_datagram(ack, GATEWAY, T0 + 0.1))) == 1
    assert sum(core.stats.dropped) == 0
    assert core.stats.calls[ANSWERED] == 1


def test_utf8_in_a_header_value_is_fine():
    core = make()
    out = core.receive_datagram(invite(extra="X-Name: Zoë".encode()), GATEWAY, T0)
    assert len(forwarded(out)) == 1


def test_body_past_content_length_is_discarded_per_rfc3261_18_3():
    core = make()
    req = invite() + b"TRAILING-JUNK\r\n"
    out = forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert len(out) == 1
    data = out[0][0]
    assert data.endswith(b"\r\n\r\n" + SDP)
    assert core.stats.body_truncated == 1


def test_header_section_ends_at_first_empty_line_whatever_the_line_ends():
    """Bare-LF headers, and a body holding CRLFCRLF and header-looking lines: the body must pass
    byte for byte and nothing from it may become a header."""
    body = b"v=0\r\n\r\nVia: SIP/2.0/UDP 6.6.6.6;branch=z9hG4bKevil\r\nRoute: <sip:6.6.6.6>\r\n"
    head, _, _ = invite(body=body).partition(b"\r\n\r\n")
    req = head.replace(b"\r\n", b"\n") + b"\n\n" + body
    core = make()
    out = forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert len(out) == 1
    data = out[0][0]
    assert data.endswith(b"\r\n\r\n" + body)
    fwd_head = headers_of(data)
    assert b"6.6.6.6" not in fwd_head and b"z9hG4bKevil" not in fwd_head


def test_too_many_vias_is_dropped():
    core = make()
    vias = b"\r\n".join(b"Via: SIP/2.0/UDP 10.0.0.%d:5060;branch=z9hG4bK%d" % (i % 250, i) for i in range(100))
    assert not forwarded(core.receive_datagram(invite(extra=vias), GATEWAY, T0))
    assert dropped(core, "too_many_headers") == 1


@pytest.mark.parametrize("where", ["top line", "second line"])
def test_via_values_hidden_behind_quotes_count_toward_the_limit(where):
    """A next hop splits Via values at commas (a Via value holds no quoted string outside a rare
    parameter): `,"a,"a...` is a hundred values to it, so the limit counts them too (a fuzz find)."""
    core = make()
    hidden = b',"a' * 100
    req = invite()
    top = req.index(b"Via: ")
    end = req.index(b"\r\n", top)
    if where == "top line":
        req = req[:end] + hidden + req[end:]
    else:
        req = req[:end] + b"\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK-x" + hidden + req[end:]
    assert not forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert dropped(core, "too_many_headers") == 1


def test_huge_route_set_naming_us_is_bounded():
    core = make()
    route = b"Route: " + b", ".join([b"<sip:10.0.0.2:5060;lr>"] * 2500)
    req = invite(extra=route)
    assert len(req) > 50_000
    assert not forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert dropped(core, "too_many_headers") == 1


def test_output_too_large_for_udp_gets_513():
    core = make()
    body = b"x" * (65507 - len(invite(body=b"")) - 40)
    req = invite(body=body)
    assert len(req) <= 65507
    out = core.receive_datagram(req, GATEWAY, T0)
    assert not forwarded(out)
    assert len(out) == 1 and out[0][0].startswith(b"SIP/2.0 513 ")
    assert dropped(core, "too_large") == 1


# -- 3. no reflection, no amplification ---------------------------------------------------
def test_forged_received_and_rport_do_not_redirect_responses():
    core = make()
    req = invite().replace(b"branch=z9hG4bK-gw-1", b"branch=z9hG4bK-gw-1;received=%s;rport=%d"
                           % (VICTIM[0].encode(), VICTIM[1]))
    (fwd, dest), = forwarded(core.receive_datagram(req, GATEWAY, T0))
    assert b"received=10.9.9.9" not in fwd and b"rport=7777" not in fwd
    for status in (100, 180, 200):
        out = core.receive_datagram(response_to(fwd, status), SIGNALING, T0 + 0.01)
        assert [a for _, a in out] == [GATEWAY]


def test_received_with_ipv6_or_garbage_cannot_raise_or_redirect():
    core = make()
    for forged in (b";received=::1", b";rport=9223372036854775808", b";received=\xc3\xa9.example",
                   b";rport=106638", b";received=[::1];rport=1"):
        req = invite(call_id=b"c-%d" % len(forged)).replace(b"branch=z9hG4bK-gw-1",
                                                          b"branch=z9hG4bK-gw-1" + forged)
        out = core.receive_datagram(req, GATEWAY, T0)
        for fwd, _ in forwarded(out):
            resp = core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.01)
            assert all(a == GATEWAY for _, a in resp)
    assert core.stats.internal_errors["datagram"] == 0


def test_via_of_separators_only_is_a_bad_via_never_an_exception():
    """ "Via: ," splits into no values. It once made the core raise out of receive_datagram in
    the mypyc build (an IndexError re-typed on its way to the catch-all) and count an internal
    error in pure Python; it is a Via we cannot read, dropped and counted as one."""
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    ours = b"Via: " + parse(fwd).get_all(b"via")[0] + b"\r\n"
    answer = response_to(fwd, 180)
    cases = [invite(call_id=b"sep-1").replace(b"Via: SIP/2.0/UDP", b"Via: ,\r\nVia: SIP/2.0/UDP", 1),
             invite(call_id=b"sep-2").replace(b"Via: SIP/2.0/UDP", b"Via: , ,,\r\nVia: SIP/2.0/UDP", 1),
             answer.replace(ours, b"Via: ,\r\n"),             # no top value
             answer.replace(ours, ours + b"Via: ,\r\n", 1)]  # no value below ours
    assert all(c.count(b"Via: ,") == 1 for c in cases)
    for i, data in enumerate(cases):
        assert core.receive_datagram(data, GATEWAY if i < 2 else SIGNALING, T0 + 0.01) == []
    assert dropped(core, "bad_via") == len(cases)
    assert core.stats.internal_errors["datagram"] == 0


def test_forged_response_with_our_via_prefix_is_not_relayed():
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    our_via = parse(fwd).get_all(b"via")[0]
    head = our_via[:our_via.rindex(b".") + 1]  # our sent-by, branch prefix and loop hash
    forged = (b"SIP/2.0 200 OK\r\nVia: " + head + b"000000000000;rport\r\n"
              b"Via: SIP/2.0/UDP 10.9.9.9:7777;branch=z9hG4bK-x\r\n"
              b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: call-1@gw\r\n"
              b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    for src in (("10.7.7.7", 5060), SIGNALING):
        assert core.receive_datagram(forged, src, T0 + 0.01) == []
    assert dropped(core, "stray_response") == 2


def test_genuine_response_from_another_source_is_not_relayed():
    """The answer must come from where the request went (a spoofer elsewhere cannot inject it)."""
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    assert core.receive_datagram(response_to(fwd, 200), ("10.7.7.7", 5080), T0 + 0.01) == []
    assert core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.02) != []


def test_answer_to_a_held_transaction_is_relayed_only_as_the_mac_would_allow():
    """While the proxy holds the transaction it skips the MAC for an answer that carries the
    sender's Via back exactly as written; anything else must still meet the MAC."""
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    good = response_to(fwd, 180, b"Ringing")
    stamped = parse(fwd).get_all(b"via")[1]
    redirected = good.replace(stamped, b"SIP/2.0/UDP %s:%d;branch=z9hG4bK-x;rport=%d;received=%s"
                              % (VICTIM[0].encode(), VICTIM[1], VICTIM[1], VICTIM[0].encode()))
    other_call = good.replace(b"Call-ID: call-1@gw", b"Call-ID: call-2@gw")
    other_cseq = good.replace(b"CSeq: 1 INVITE", b"CSeq: 2 INVITE")
    assert other_call != good and other_cseq != good and redirected != good
    for forged in (redirected, other_call, other_cseq):
        assert core.receive_datagram(forged, SIGNALING, T0 + 0.01) == []
    assert core.receive_datagram(good, ("10.7.7.7", SIGNALING[1]), T0 + 0.01) == []
    assert dropped(core, "stray_response") == 4
    assert [a for _, a in core.receive_datagram(good, SIGNALING, T0 + 0.02)] == [GATEWAY]
    # after a restart (no state), the same answer is relayed on the strength of the MAC alone
    again = make()
    again.key, again._mac_base = core.key, core._mac_base
    assert [a for _, a in again.receive_datagram(good, SIGNALING, T0 + 0.03)] == [GATEWAY]
    assert again.receive_datagram(redirected, SIGNALING, T0 + 0.03) == []


def test_status_line_without_reason_phrase_is_relayed_repaired():
    """``SIP/2.0 180`` (no SP, no reason phrase) from a sloppy UAS still reaches the caller, with the
    SP RFC 3261 §7.2 requires before the (empty) reason phrase."""
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    resp = response_to(fwd, 180, b"Ringing").replace(b"SIP/2.0 180 Ringing\r\n", b"SIP/2.0 180\r\n")
    assert resp.startswith(b"SIP/2.0 180\r\n")
    (out, dest), = core.receive_datagram(resp, SIGNALING, T0 + 0.01)
    assert dest == GATEWAY and out.startswith(b"SIP/2.0 180 \r\n")


def test_request_spoofed_from_upstream_cannot_reach_arbitrary_hosts():
    core = make()
    req = (b"OPTIONS sip:x@10.9.9.9:7777 SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-spoof\r\n"
           b"From: <sip:s@10.0.0.3>;tag=1\r\nTo: <sip:x@10.9.9.9>\r\nCall-ID: spoof\r\n"
           b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    out = core.receive_datagram(req, SIGNALING, T0)
    assert not forwarded(out)
    assert [(d[:12], a) for d, a in out] == [(b"SIP/2.0 403 ", SIGNALING)]
    assert dropped(core, "next_hop_denied") == 1
    # a host name is never resolved, whatever the policy
    named = req.replace(b"x@10.9.9.9:7777", b"x@victim.example")
    assert not forwarded(make(allow_next_hop=(ipaddress.ip_network("0.0.0.0/0"),))
                         .receive_datagram(named, SIGNALING, T0))


def test_allow_next_hop_networks():
    core = make(allow_next_hop=(ipaddress.ip_network("10.9.0.0/16"),))
    req = (b"OPTIONS sip:x@10.9.9.9:7777 SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-ok\r\n"
           b"From: <sip:s@10.0.0.3>;tag=1\r\nTo: <sip:x@10.9.9.9>\r\nCall-ID: ok\r\n"
           b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    assert [a for _, a in forwarded(core.receive_datagram(req, SIGNALING, T0))] == [("10.9.9.9", 7777)]
    other = req.replace(b"10.9.9.9:7777", b"10.8.9.9:7777")
    assert not forwarded(core.receive_datagram(other, SIGNALING, T0))


def test_local_responses_never_exceed_the_request():
    core = make()
    # a tiny request with Max-Forwards 0 and a long To/From would be answered bigger than itself
    req = (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKa\r\n"
           b"f: <sip:a@b>;tag=1\r\nt: <sip:b@b>\r\ni: x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 0\r\n\r\n")
    for d, _ in core.receive_datagram(req, GATEWAY, T0):
        assert len(d) <= len(req)


# -- 6. drain and restart -----------------------------------------------------------------
def test_draining_answers_new_dialogs_503_and_passes_in_dialog_requests():
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.01)
    core.draining = True
    out = core.receive_datagram(invite(call_id=b"new-call"), GATEWAY, T0 + 1)
    assert len(out) == 1 and out[0][0].startswith(b"SIP/2.0 503 ") and out[0][1] == GATEWAY
    assert b"\r\nRetry-After: " in out[0][0]
    assert core.stats.drain_rejected == 1
    bye = invite(method=b"BYE", cseq=2, to_tag=b"uas-1", body=b"")
    assert [a for _, a in forwarded(core.receive_datagram(bye, GATEWAY, T0 + 2))] == [SIGNALING]


def _bye_from_signaling(route: bytes) -> bytes:
    return (b"BYE sip:alice@10.0.0.1:5070 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-sig-bye\r\n"
            b"Route: " + route + b"\r\n"
            b"From: <sip:+15551234567@10.0.0.3>;tag=uas-1\r\n"
            b"To: <sip:+15557654321@10.0.0.1>;tag=from-1\r\n"
            b"Call-ID: call-1@gw\r\nCSeq: 5 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")


def test_restarted_sidecar_with_the_same_secret_forwards_in_dialog_requests():
    before = make(secret=b"s3cret")
    (fwd, _), = forwarded(before.receive_datagram(invite(), GATEWAY, T0))
    rr = parse(fwd).get(b"record-route")
    after = make(secret=b"s3cret")  # a new process: nothing seen, nothing remembered
    out = forwarded(after.receive_datagram(_bye_from_signaling(rr), SIGNALING, T0 + 60))
    assert [a for _, a in out] == [("10.0.0.1", 5070)]
    # the answer to the INVITE forwarded before the restart is still relayed
    assert [a for _, a in after.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 61)] == [GATEWAY]
    # with another key, or a forged signature, the same request is refused
    other = make(secret=b"other")
    assert not forwarded(other.receive_datagram(_bye_from_signaling(rr), SIGNALING, T0 + 60))
    forged = rr[:rr.index(b"sw=") + 3] + b"0123456789ab>"
    assert not forwarded(after.receive_datagram(_bye_from_signaling(forged), SIGNALING, T0 + 60))


# -- 4. nothing raises ---------------------------------------------------------------------
@pytest.mark.pure_python
def test_internal_error_is_counted_not_raised(monkeypatch):
    core = make()

    def boom(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(core.tracker, "request", boom)
    assert core.receive_datagram(invite(), GATEWAY, T0) == []
    assert core.stats.internal_errors["datagram"] == 1 and dropped(core, "internal_error") == 1
    assert "RuntimeError" in core.last_internal_error


# -- 7. forks, and Call-IDs reused -----------------------------------------------------------
def test_forked_2xx_is_relayed_and_counted_as_a_fork_not_a_retransmission():
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    for tag in (b"uas-1", b"uas-2"):
        out = core.receive_datagram(response_to(fwd, 200, to_tag=tag), SIGNALING, T0 + 0.05)
        assert [a for _, a in out] == [GATEWAY]  # RFC 3261 §16.7 step 10: every 2xx goes back
    assert core.stats.forks == 1 and core.stats.response_retransmissions == 0
    core.receive_datagram(response_to(fwd, 200, to_tag=b"uas-2"), SIGNALING, T0 + 0.5)
    assert core.stats.forks == 1 and core.stats.response_retransmissions == 1


def test_call_id_first_used_by_register_still_gives_the_call():
    core = make()
    reg = invite(method=b"REGISTER", body=b"").replace(b"INVITE sip:", b"REGISTER sip:")
    (fwd, _), = forwarded(core.receive_datagram(reg, GATEWAY, T0))
    core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.01)
    (fwd, _), = forwarded(core.receive_datagram(invite(cseq=2, branch=b"z9hG4bK-gw-2"), GATEWAY, T0 + 1))
    core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 1.05)
    from sipwatch.stats import ANSWERED
    assert core.stats.calls[ANSWERED] == 1 and core.stats.active_calls == 1


def test_phone_keepalives_are_keepalives_not_parse_errors():
    """Phones send 'hello', 'jaK', CRLF, NUL fill or STUN to the SIP port to keep NAT open."""
    core = make()
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x01" * 12
    for ka in (b"hello", b"jaK", b"jaK\r\n", b"\r\n", b"\r\n\r\n", b"\x00\x00\x00\x00", stun):
        assert core.receive_datagram(ka, GATEWAY, T0) == []
    assert core.stats.keepalives == 7 and core.stats.parse_errors == 0
    assert core.receive_datagram(b"hello there, this is not SIP", GATEWAY, T0) == []
    assert core.stats.parse_errors == 1 and dropped(core, "not_sip") == 1


def test_forged_sources_keep_the_address_memo_bounded_and_responses_go_where_requests_came_from():
    """Transactions share one tuple per address (ProxyCore._shared): 10,000 sources that each send
    one INVITE (forged, from a flood) must not grow that memo past its bound, and every call's
    response still goes back to where its own request came from, not to an address remembered for
    another."""
    from sipwatch.core import _TEXT_MEMO_MAX
    core = make()
    sources = [("198.18.%d.%d" % (i >> 8 & 255, i & 255), 1024 + i % 60000) for i in range(10_000)]
    sent = []
    for i, src in enumerate(sources):
        (fwd, dest), = forwarded(core.receive_datagram(
            invite(call_id=b"flood-%d" % i, branch=b"z9hG4bK-flood-%d" % i), src, T0 + i * 1e-4))
        assert dest == SIGNALING
        sent.append(fwd)
        assert len(core._addr_memo) <= _TEXT_MEMO_MAX
    for i in (0, 4095, 4096, 8191, 9999):  # either side of each memo clearing
        (resp, dest), = core.receive_datagram(response_to(sent[i], 180, b"Ringing"), SIGNALING, T0 + 2)
        # (the source's IP, the Via's port: the Via carries no rport)
        assert resp.startswith(b"SIP/2.0 180") and dest == (sources[i][0], 5070)


def _big_invite(i: int) -> bytes:
    """A 55-KB INVITE whose Call-ID (20 KB), From (15 KB), Request-URI (3 KB) and top Via
    (5 KB) are what a proxy keeps of a call and its transaction."""
    req = invite(call_id=b"%d-" % i + b"c" * 20_000, branch=b"z9hG4bK-big-%d-" % i + b"b" * 5000,
                 extra=b"X-Pad: " + b"p" * 10_000)
    return req.replace(b";tag=from-1", b";tag=" + b"f" * 15_000).replace(
        b"sip:+15551234567@10.0.0.3:5080", b"sip:+1555" + b"7" * 3000 + b"@10.0.0.3:5080")


def test_what_the_tables_hold_does_not_follow_the_size_of_the_datagrams():
    """The call and transaction tables were bounded by count only: each call kept its Call-ID,
    From, To and Request-URI whole, each transaction the Via below ours, so 100,000 calls of
    55-KB INVITEs held ~3.6 GB (36 KB a call, measured). Now the bytes are bounded too (1 KB a
    call of max_calls on average, oldest evicted first, counted) and a transaction keeps no Via
    of over 1 KB; every INVITE is still forwarded. Ground truth: the memory Python allocated."""
    import tracemalloc
    core = make(max_calls=2000, max_transactions=4000)  # (budgets of 2 MB and 4 MB)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(800):
            out = core.receive_datagram(_big_invite(i), GATEWAY, T0 + i * 0.001)
            assert [a for _, a in forwarded(out)] == [SIGNALING]
            for kind, rec in core.drain_finished():  # (the proxy's tick consumes the records)
                if kind == "call":
                    rec.let_go()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tracker = core.tracker
    assert held < 10 << 20, held  # (counted alone, 800 such calls held ~34 MB)
    assert tracker.call_bytes == sum(c.nbytes for c in tracker.calls.values()) <= tracker.max_call_bytes
    assert tracker.tx_bytes == sum(t.nbytes for t in tracker.transactions.values()) <= tracker.max_tx_bytes
    assert core.stats.evicted_calls > 600 and all(t.via_below is None for t in tracker.transactions.values())
    # an answer to a call still held is relayed (its transaction takes the MAC check, not the Via)
    last = forwarded(core.receive_datagram(_big_invite(400), GATEWAY, T0 + 1))[0][0]
    out = core.receive_datagram(response_to(last, 200), SIGNALING, T0 + 1.1)
    assert [a for _, a in out] == [GATEWAY]


def test_the_tables_count_their_bytes_exactly_as_entries_come_and_go():
    """call_bytes and tx_bytes are running sums: each entry adds its nbytes on the way in and
    takes them out on every way out (replaced, evicted, expired), whatever the order."""
    import random as rnd
    r = rnd.Random(7)
    core = make(max_calls=20, max_transactions=30, timer_b=1.0)
    tracker = core.tracker
    sent = []
    t = T0
    for i in range(600):
        t += r.choice((0.001, 0.01, 0.3))
        kind = r.random()
        if kind < 0.6 or not sent:
            cid = b"%d-" % i + b"c" * r.choice((10, 500, 3000))
            out = forwarded(core.receive_datagram(
                invite(call_id=cid, branch=b"z9hG4bK-x-%d" % i), GATEWAY, t))
            sent += [d for d, _ in out]
        elif kind < 0.9:
            core.receive_datagram(response_to(r.choice(sent), r.choice((180, 200, 486))), SIGNALING, t)
        else:
            tracker.expire(t)
            core.drain_finished()
        assert tracker.call_bytes == sum(c.nbytes for c in tracker.calls.values())
        assert tracker.tx_bytes == sum(x.nbytes for x in tracker.transactions.values())
    tracker.expire(t + 1e6)
    assert not tracker.transactions and tracker.tx_bytes == 0


def _outbound_options(n: int) -> bytes:
    """Signaling's out-of-dialog request toward the gateway (no Route: the next-hop policy)."""
    return (b"OPTIONS sip:ping@10.0.0.1:5070 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-out-%d\r\n"
            b"From: <sip:s@10.0.0.3>;tag=1\r\nTo: <sip:ping@10.0.0.1>\r\nCall-ID: out-%d\r\n"
            b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n" % (n, n))


def test_forged_sources_cannot_push_a_proven_gateway_out_of_the_next_hop_policy():
    """Requests from signaling may go to gateway-side sources seen lately. That table was one
    bounded list: 4096 requests from new (forged) sources pushed the gateway out, and signaling's
    outbound calls to it were refused (next_hop_denied) until it spoke again. A source that sends
    the ACK of a 2xx relayed to it has received what was sent to it (a forged source never sees
    that answer): it is now kept apart, and new sources push out only each other."""
    core = make()
    (fwd, _), = forwarded(core.receive_datagram(invite(), GATEWAY, T0))
    (ok, dest), = core.receive_datagram(response_to(fwd, 200), SIGNALING, T0 + 0.1)
    assert dest == GATEWAY
    ack = invite(method=b"ACK", to_tag=b"uas-1", body=b"")
    # the same ACK from another address (forged, or another gateway) proves nothing
    assert forwarded(core.receive_datagram(ack, ("10.0.0.66", 5070), T0 + 0.2))
    assert forwarded(core.receive_datagram(ack, GATEWAY, T0 + 0.2))
    assert GATEWAY[0] in core.gateway_proven and "10.0.0.66" not in core.gateway_proven
    for i in range(5000):  # new sources, each one request
        src = ("10.%d.%d.%d" % (100 + i // 65536, i // 256 % 256, i % 256), 5070)
        core.receive_datagram(_outbound_options(10_000 + i).replace(b"10.0.0.3:5080;", b"%s:5070;" % src[0].encode()),
                              src, T0 + 1 + i / 1000)
    assert len(core.gateway_seen) <= 4096 and "10.0.0.66" not in core.gateway_seen
    out = core.receive_datagram(_outbound_options(1), SIGNALING, T0 + 10)
    assert [a for _, a in forwarded(out)] == [GATEWAY]  # before: 403, next_hop_denied
    assert dropped(core, "next_hop_denied") == 0


def test_a_gateway_that_answers_signalings_requests_is_proven():
    """A gateway that only takes calls from signaling (never sends an ACK of a 2xx) is proven by
    its answers: a response is relayed only from the address its request went to (branch MAC)."""
    core = make(allow_next_hop=(ipaddress.ip_network("10.0.0.1/32"),))
    (fwd, dest), = forwarded(core.receive_datagram(_outbound_options(3), SIGNALING, T0))
    assert dest == GATEWAY and not core.gateway_proven
    assert core.receive_datagram(response_to(fwd, 200), ("10.0.0.66", 5070), T0 + 0.1) == []  # forged
    assert "10.0.0.66" not in core.gateway_proven and not core.gateway_seen
    (_, back), = core.receive_datagram(response_to(fwd, 200), GATEWAY, T0 + 0.1)
    assert back == SIGNALING and GATEWAY[0] in core.gateway_proven


def test_a_gateway_that_never_answered_a_call_is_still_allowed_while_seen():
    core = make()
    core.receive_datagram(invite(), GATEWAY, T0)
    out = core.receive_datagram(_outbound_options(2), SIGNALING, T0 + 1)
    assert [a for _, a in forwarded(out)] == [GATEWAY]
    assert GATEWAY[0] in core.gateway_seen and not core.gateway_proven

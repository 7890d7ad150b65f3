"""The sans-IO proxy core driven directly: bytes in, bytes out, time passed in.

No sockets and no clock: every figure asserted here (RTTs, timeouts, outcomes) follows from the
timestamps the test passes, so these tests are exact.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sipwatch.core import BRANCH_PREFIX, CoreConfig, ProxyCore
from sipwatch.sipmsg import parse, parse_via, split_values
from sipwatch.stats import (
    ANSWERED, CANCELLED, INVITE, METHOD_INDEX, OUTCOMES, REJ4, TIMEOUT, FROM_GATEWAY,
    FROM_SIGNALING,
)
from sipwatch.tracecontext import parse_traceparent

SIDECAR = ("10.0.0.2", 5060)
GATEWAY = ("10.0.0.1", 5070)
SIGNALING = ("10.0.0.3", 5080)
T0 = 1_700_000_000.0

SDP = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n")


def invite(branch=b"z9hG4bK-gw-1", call_id=b"call-1@gw", extra=b"", max_forwards=b"70",
           body=SDP, cseq=1, to_tag=b"", method=b"INVITE"):
    head = [
        method + b" sip:+15551234567@10.0.0.3:5080 SIP/2.0",
        b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=" + branch,
        b"From: \"Alice\" <sip:+15557654321@10.0.0.1>;tag=from-1",
        b"To: <sip:+15551234567@10.0.0.3>" + (b";tag=" + to_tag if to_tag else b""),
        b"Call-ID: " + call_id,
        b"CSeq: %d %s" % (cseq, method),
        b"Contact: <sip:alice@10.0.0.1:5070>",
    ]
    if max_forwards is not None:
        head.append(b"Max-Forwards: " + max_forwards)
    if extra:
        head.append(extra)
    head += [b"Content-Type: application/sdp", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def response_to(forwarded: bytes, status: int, reason=b"OK", to_tag=b"uas-1") -> bytes:
    """What a UAS answers to a request it received: Vias, From, To(+tag), Call-ID, CSeq copied."""
    msg = parse(forwarded)
    out = [b"SIP/2.0 %d %s" % (status, reason)]
    for name, line in zip(msg.names, msg.lines):
        if name in (b"via", b"from", b"call-id", b"cseq", b"record-route"):
            out.append(line)
        elif name == b"to":
            out.append(line + (b";tag=" + to_tag if status > 100 and b"tag=" not in line else b""))
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


@pytest.fixture
def core():
    return ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, timer_b=32.0))


def forward_one(core, data, src=GATEWAY, now=T0):
    out = core.receive_datagram(data, src, now)
    assert len(out) == 1, out
    return out[0]


def test_invite_is_forwarded_upstream_with_proxy_edits(core):
    data, dest = forward_one(core, invite())
    assert dest == SIGNALING
    msg = parse(data)
    vias = [v for line in msg.get_all(b"via") for v in split_values(line)]
    top = parse_via(vias[0])
    assert (top.host, top.port) == (b"10.0.0.2", 5060)
    assert top.branch.startswith(b"z9hG4bK") and b"rport" in top.params
    assert vias[1].startswith(b"SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-1")
    assert msg.get(b"max-forwards") == b"69"
    rr = msg.get(b"record-route")  # ours, signed with the gateway-side party (sw=)
    assert rr.startswith(b"<sip:10.0.0.2:5060;lr;sw=") and rr.endswith(b">")
    tp = parse_traceparent(msg.get(b"traceparent"))
    assert tp is not None and tp[2] == 1
    assert msg.body == SDP and msg.get(b"content-length") == b"%d" % len(SDP)
    assert data.endswith(b"\r\n\r\n" + SDP)


def test_retransmission_keeps_branch_and_is_timed_once(core):
    first, _ = forward_one(core, invite(), now=T0)
    again, _ = forward_one(core, invite(), now=T0 + 0.5)
    b1 = parse(first).top_via().branch
    assert b1 == parse(again).top_via().branch
    assert core.stats.request_retransmissions == 1
    # the answer arrives 0.8 s after the first copy: RTT is 800 ms, not 300 ms
    out = core.receive_datagram(response_to(first, 100, b"Trying"), SIGNALING, T0 + 0.8)
    assert out and out[0][1] == GATEWAY
    ring = core.stats.ring
    assert ring.n == 1 and ring.method[0] == INVITE
    assert ring.rtt[0] == pytest.approx(800.0)
    # a second 100 (retransmitted response) is forwarded but not timed again
    core.receive_datagram(response_to(first, 100, b"Trying"), SIGNALING, T0 + 1.0)
    assert ring.n == 1 and core.stats.response_retransmissions == 1


def test_other_branch_gives_other_outgoing_branch(core):
    a, _ = forward_one(core, invite(branch=b"z9hG4bK-a"))
    b, _ = forward_one(core, invite(branch=b"z9hG4bK-b", call_id=b"other"))
    assert parse(a).top_via().branch != parse(b).top_via().branch


def test_response_pops_own_via_and_honours_received_rport(core):
    req = invite(extra=b"")
    # the caller is behind NAT: it wrote a private address and ;rport in its Via
    req = req.replace(b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-1",
                      b"Via: SIP/2.0/UDP 192.168.1.5:5999;rport;branch=z9hG4bK-gw-1")
    fwd, _ = forward_one(core, req, src=("203.0.113.7", 40000))
    second = split_values(parse(fwd).get_all(b"via")[0])
    caller_via = parse_via(second[1] if len(second) > 1 else parse(fwd).get_all(b"via")[1])
    assert caller_via.params[b"received"] == b"203.0.113.7"
    assert caller_via.params[b"rport"] == b"40000"
    resp = response_to(fwd, 180, b"Ringing")
    out = core.receive_datagram(resp, SIGNALING, T0 + 0.01)
    data, dest = out[0]
    assert dest == ("203.0.113.7", 40000)
    vias = parse(data).get_all(b"via")
    assert len(vias) == 1 and b"192.168.1.5" in vias[0]


_RPORT_PIECES = [b";rport", b";RPORT", b";rPort", b";rportx", b";rport2=1", b";r=1", b";Rx",
                 b";branch=z9hG4bK-p", b";lr", b"; rport", b";rport ", b";rport\t", b";x=rport"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_RPORT_PIECES), max_size=6))
def test_empty_rport_of_the_sender_is_filled_once_wherever_and_however_it_is_written(pieces):
    """RFC 3581 §4: the first empty ``rport`` parameter (names are case-insensitive) gets the
    source port; without one, ``;rport=`` is added. The model is a regular expression, not the
    proxy's own search. A sender that asked for no rport gets none."""
    import re
    params = b"".join(pieces)
    if not params.startswith(b";branch=") and b";branch=z9hG4bK" not in params:
        params += b";branch=z9hG4bK-p"
    via = b"SIP/2.0/UDP 198.51.100.9:5999" + params
    core = ProxyCore(CoreConfig(advertise=("127.0.0.1", 5070), upstream=SIGNALING))
    req = invite(extra=b"").replace(b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-1", b"Via: " + via)
    out = core.receive_datagram(req, ("198.51.100.9", 40000), T0)
    assert len(out) == 1, core.stats.dropped
    lines = out[0][0].split(b"\r\n")
    vias = [ln for ln in lines if ln.startswith(b"Via: ")]
    sender = vias[1][5:] if len(vias) > 1 else split_values(vias[0][5:])[1]
    via = via.rstrip(b" \t")  # (a header value ends at its last non-blank)
    asked = any(p.split(b"=")[0].strip().lower() == b"rport" for p in params.split(b";")[1:])
    m = re.search(rb";rport(?=$|[;, \t])", via, re.IGNORECASE)
    if not asked:
        want = via
    elif m is None:
        want = via + b";rport=40000"
    else:
        want = via[:m.end()] + b"=40000" + via[m.end():]
    assert sender == want


def test_call_answered_then_bye_gives_outcome_setup_and_duration(core):
    inv, _ = forward_one(core, invite(), now=T0)
    for status, t in ((100, 0.002), (180, 0.100), (200, 0.250)):
        core.receive_datagram(response_to(inv, status, b"X"), SIGNALING, T0 + t)
    assert core.stats.calls[ANSWERED] == 1 and core.stats.active_calls == 1
    ack = invite(method=b"ACK", to_tag=b"uas-1", body=b"", branch=b"z9hG4bK-ack")
    ack = ack.replace(b"INVITE sip", b"ACK sip")
    core.receive_datagram(ack, GATEWAY, T0 + 0.26)
    bye = invite(method=b"BYE", to_tag=b"uas-1", body=b"", branch=b"z9hG4bK-bye", cseq=2)
    byef, _ = forward_one(core, bye, now=T0 + 10.0)
    core.receive_datagram(response_to(byef, 200), SIGNALING, T0 + 10.004)
    records = core.drain_finished()
    calls = [obj for kind, obj in records if kind == "call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.t_setup - call.t_start == pytest.approx(0.100)
    assert call.t_answer - call.t_start == pytest.approx(0.250)
    assert call.t_end - call.t_answer == pytest.approx(9.754)
    assert core.stats.active_calls == 0
    methods = sorted(tx.method for kind, tx in records if kind == "tx")
    assert methods == [b"ACK", b"BYE", b"INVITE"]
    # every forwarded request carried the same trace id, each its own span id
    assert len({tx.trace_id for kind, tx in records if kind == "tx"}) == 1
    assert len({tx.span_id for kind, tx in records if kind == "tx"}) == 3


@pytest.mark.parametrize("status,outcome", [(486, REJ4), (603, OUTCOMES.index("rejected_6xx")),
                                            (302, OUTCOMES.index("redirected"))])
def test_failed_call_outcomes(core, status, outcome):
    inv, _ = forward_one(core, invite())
    core.receive_datagram(response_to(inv, status, b"No"), SIGNALING, T0 + 0.05)
    assert core.stats.calls[outcome] == 1 and sum(core.stats.calls) == 1


def test_cancel_then_487_counts_cancelled(core):
    inv, _ = forward_one(core, invite())
    core.receive_datagram(response_to(inv, 180, b"Ringing"), SIGNALING, T0 + 0.1)
    cancel = invite(method=b"CANCEL", body=b"").replace(b"INVITE sip", b"CANCEL sip")
    canf, _ = forward_one(core, cancel, now=T0 + 1)
    # CANCEL must carry the same branch as the INVITE it cancels (RFC 3261 §9.1)
    assert parse(canf).top_via().branch == parse(inv).top_via().branch
    core.receive_datagram(response_to(canf, 200), SIGNALING, T0 + 1.01)
    core.receive_datagram(response_to(inv, 487, b"Request Terminated"), SIGNALING, T0 + 1.02)
    assert core.stats.calls[CANCELLED] == 1 and sum(core.stats.calls) == 1


def test_unanswered_invite_times_out_at_timer_b(core):
    forward_one(core, invite())
    core.handle_timers(T0 + 31.9)
    assert core.stats.timeouts[INVITE] == 0
    core.handle_timers(T0 + 32.1)
    assert core.stats.timeouts[INVITE] == 1 and core.stats.calls[TIMEOUT] == 1
    assert not core.tracker.transactions


def test_max_forwards_zero_is_answered_483_locally(core):
    out = core.receive_datagram(invite(max_forwards=b"0"), GATEWAY, T0)
    assert len(out) == 1
    data, dest = out[0]
    assert data.startswith(b"SIP/2.0 483 ") and dest == GATEWAY
    assert core.stats.too_many_hops == 1


def test_missing_max_forwards_is_inserted(core):
    data, _ = forward_one(core, invite(max_forwards=None))
    assert parse(data).get(b"max-forwards") == b"70"


def test_loop_is_detected_482(core):
    fwd, _ = forward_one(core, invite())
    # the same request comes back to us unchanged (a misrouted upstream)
    out = core.receive_datagram(fwd, ("10.0.0.9", 5060), T0 + 0.01)
    assert out[0][0].startswith(b"SIP/2.0 482 ")
    assert core.stats.loops == 1


def test_spiral_is_forwarded_and_each_loop_field_tells_a_loop_from_it(core):
    """RFC 3261 §16.3 step 4: our own Via on a request is a loop only when the request is the
    same one (Request-URI, From tag, Call-ID, CSeq); any of them changed is a spiral, forwarded
    with a Via of ours whose loop tag differs from the first one's."""
    fwd, _ = forward_one(core, invite())
    first = parse_via(split_values(parse(fwd).get(b"via"))[0]).branch
    uri = b"sip:+15551234567@10.0.0.3:5080"
    changes = [(uri, b"sip:+15550000000@10.0.0.3:5080"), (b"tag=from-1", b"tag=from-2"),
               (b"Call-ID: call-1@gw", b"Call-ID: call-2@gw"), (b"CSeq: 1 INVITE", b"CSeq: 2 INVITE")]
    for i, (old, new) in enumerate(changes):
        assert fwd.count(old) >= 1
        again = fwd.replace(old, new)
        out = core.receive_datagram(again, ("10.0.0.9", 5060), T0 + 0.01 * (i + 1))
        assert len(out) == 1 and not out[0][0].startswith(b"SIP/2.0"), (old, out)
        mine = parse_via(split_values(parse(out[0][0]).get(b"via"))[0]).branch
        assert mine.startswith(BRANCH_PREFIX) and mine != first
        assert mine[:len(BRANCH_PREFIX) + 13] != first[:len(BRANCH_PREFIX) + 13], old  # the loop tag
    assert core.stats.loops == 0
    out = core.receive_datagram(fwd, ("10.0.0.9", 5060), T0 + 0.1)  # the same request: a loop
    assert out[0][0].startswith(b"SIP/2.0 482 ") and core.stats.loops == 1


def test_incoming_traceparent_is_joined_and_invalid_one_replaced(core):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    good = invite(extra=f"traceparent: 00-{trace}-00f067aa0ba902b7-01".encode())
    fwd, _ = forward_one(core, good)
    tid, span, flags = parse_traceparent(parse(fwd).get(b"traceparent"))
    assert "%032x" % tid == trace and span != 0x00f067aa0ba902b7 and flags == 1
    assert core.stats.traceparent_joined == 1
    bad = invite(call_id=b"c2", extra=b"traceparent: 00-XYZ-nothex-01")
    fwd2, _ = forward_one(core, bad)
    assert parse_traceparent(parse(fwd2).get(b"traceparent")) is not None
    assert len(parse(fwd2).get_all(b"traceparent")) == 1
    assert core.stats.traceparent_invalid == 1


VICTIM_TP = b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01"  # another party's trace
CALLER_TP = b"00-" + b"11" * 16 + b"-" + b"22" * 8 + b"-01"


def _trace_out(data: bytes) -> dict:
    """{lowercase trace header: [values]} of a forwarded request, and its whole parse."""
    msg = parse(data)
    return {n: msg.get_all(n) for n in (b"traceparent", b"x-traceparent", b"x-trace-id", b"tracestate")}


@pytest.mark.parametrize("extra, trace_header, joined", [
    # W3C Trace Context's test data: two traceparent headers are invalid, whatever they hold
    (b"traceparent: " + CALLER_TP + b"\r\ntraceparent: " + VICTIM_TP, "traceparent", None),
    (b"traceparent: junk\r\nTRACEPARENT: " + VICTIM_TP, "traceparent", None),
    # read but not stamped: left with this hop's context, not another trace's
    (b"traceparent: junk\r\nX-Traceparent: " + VICTIM_TP, "traceparent", None),
    (b"X-Traceparent: " + CALLER_TP, "traceparent", 0x11111111111111111111111111111111),
    (b"X-Trace-ID: " + b"ab" * 16 + b"\r\nX-Trace-ID: " + b"cd" * 16, "traceparent", 0xabababababababababababababababab),
    (b"X-Traceparent: " + CALLER_TP + b"\r\nX-Traceparent: " + VICTIM_TP, "traceparent,X-Traceparent", None),
    (b"traceparent: " + CALLER_TP + b"\r\n" + b"\r\n".join([b"traceparent: " + VICTIM_TP] * 100), "traceparent", None),
])
def test_each_trace_header_leaves_once_with_this_hops_context(extra, trace_header, joined):
    """A second traceparent (or X-Traceparent) went out as it came: sip-signaling reading the
    last one joined another party's trace, and one read but not stamped (X-Traceparent,
    X-Trace-ID) kept a trace the sidecar had not joined. Now every trace header that came in or
    is stamped leaves once, with this hop's trace and span."""
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, trace_header=trace_header))
    data, _ = forward_one(core, invite(extra=extra))
    out = _trace_out(data)
    call = core.tracker.calls[b"call-1@gw"]
    assert len(out[b"traceparent"]) == 1
    tid, span, _ = parse_traceparent(out[b"traceparent"][0])
    assert tid == call.trace_id
    for n in (b"x-traceparent", b"x-trace-id"):
        assert len(out[n]) <= 1
        if n.decode() in extra.decode().lower() or n.decode() in trace_header.lower():
            assert len(out[n]) == 1
    if out[b"x-traceparent"]:
        assert out[b"x-traceparent"] == out[b"traceparent"]
    if out[b"x-trace-id"]:
        assert out[b"x-trace-id"] == [b"%032x" % tid]
    if joined is None:
        assert core.stats.traceparent_invalid >= 1 and core.stats.traceparent_joined == 0
        assert tid not in (0xabababababababababababababababab, 0x11111111111111111111111111111111)
    else:
        assert tid == joined and core.stats.traceparent_joined == 1
    assert b"cd" * 8 not in data and (joined is not None or b"ab" * 16 not in data)


def test_trace_headers_above_the_top_via_go_without_moving_it():
    """Copies deleted above the top Via: the sidecar's own Via still goes on top of it."""
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    msg = invite(extra=b"traceparent: " + CALLER_TP)
    first, rest = msg.split(b"\r\n", 1)
    data, _ = forward_one(core, first + b"\r\ntraceparent: " + VICTIM_TP + b"\r\ntracestate: x=1\r\n" + rest)
    fwd = parse(data)
    vias = [i for i, n in enumerate(fwd.names) if n == b"via"]
    # ours, our Record-Route, the gateway's: as without the lines above
    assert fwd.names[vias[0]:vias[0] + 3] == [b"via", b"record-route", b"via"] and len(vias) == 2
    assert parse_via(split_values(fwd.value_at(vias[0]))[0]).host == b"10.0.0.2"
    assert b"10.0.0.1:5070" in fwd.lines[vias[1]]
    assert len(fwd.get_all(b"traceparent")) == 1 and not fwd.get_all(b"tracestate")


def test_tracestate_goes_with_the_trace_it_belongs_to():
    """W3C Trace Context: a tracestate without a valid traceparent is discarded. It rode along
    on every new trace the sidecar started (after an invalid traceparent, or none). Kept where
    the request continues the traceparent's trace, the call's later requests too."""
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    state = b"tracestate: vendor=1,other=2\r\ntracestate: third=3"
    data, _ = forward_one(core, invite(extra=b"traceparent: " + CALLER_TP + b"\r\n" + state))
    assert _trace_out(data)[b"tracestate"] == [b"vendor=1", b"other=2", b"third=3"]
    bye = invite(method=b"BYE", cseq=2, to_tag=b"uas-1", branch=b"z9hG4bK-gw-bye", body=b"",
                 extra=b"traceparent: " + CALLER_TP[:-2] + b"00\r\n" + state)
    data, _ = forward_one(core, bye, now=T0 + 1)
    assert _trace_out(data)[b"tracestate"] == [b"vendor=1", b"other=2", b"third=3"]
    for i, extra in enumerate((b"traceparent: junk\r\n" + state, state,
                               b"traceparent: " + CALLER_TP + b"\r\ntraceparent: " + CALLER_TP + b"\r\n" + state,
                               b"X-Trace-ID: " + b"ab" * 16 + b"\r\n" + state)):
        data, _ = forward_one(core, invite(call_id=b"c%d" % i, branch=b"z9hG4bK-s%d" % i, extra=extra))
        assert _trace_out(data)[b"tracestate"] == [], extra
    # an in-dialog request naming another trace than its call's: the state is that other trace's
    bye = invite(method=b"BYE", cseq=2, to_tag=b"uas-1", branch=b"z9hG4bK-gw-bye2", body=b"", call_id=b"c0",
                 extra=b"traceparent: " + VICTIM_TP + b"\r\n" + state)
    data, _ = forward_one(core, bye, now=T0 + 1)
    assert _trace_out(data)[b"tracestate"] == []


def test_unsampled_incoming_context_stays_unsampled(core):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    fwd, _ = forward_one(core, invite(extra=f"X-Traceparent: 00-{trace}-00f067aa0ba902b7-00".encode()))
    assert parse_traceparent(parse(fwd).get(b"traceparent"))[2] == 0


def test_plain_traceidratio_decides_joined_traces_too_and_says_so_in_sip():
    """OTEL_TRACES_SAMPLER=traceidratio ignores the caller's flag: the span worker exported by
    the ratio alone, while the core wrote the caller's ``-01`` into the forwarded request, so
    sip-signaling parented its spans to a span never exported. The flag written is now the
    decision the spans follow (OpenTelemetry's own TraceIdRatioBased as the reference); a
    parent-based sampler keeps the caller's."""
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
    reference = TraceIdRatioBased(0.5)
    plain = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, sample_ratio=0.5, parent_based=False))
    based = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, sample_ratio=0.5))
    seen = set()
    for i in range(64):
        trace = "%032x" % (0x4bf92f3577b34da6a3ce929d0e0e4736 * (i + 1) % (1 << 128))
        for caller in (0, 1):
            msg = invite(call_id=b"c%d-%d" % (i, caller), branch=b"z9hG4bK-%d-%d" % (i, caller),
                         extra=f"traceparent: 00-{trace}-00f067aa0ba902b7-0{caller}".encode())
            want = reference.should_sample(None, int(trace, 16), "INVITE").decision == Decision.RECORD_AND_SAMPLE
            fwd, _ = forward_one(plain, msg)
            assert parse_traceparent(parse(fwd).get(b"traceparent"))[2] == int(want), (trace, caller)
            fwd, _ = forward_one(based, msg)
            assert parse_traceparent(parse(fwd).get(b"traceparent"))[2] == caller
            seen.add(want)
    assert seen == {True, False}


def test_custom_trace_header_name():
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, trace_header="X-Trace"))
    data, _ = forward_one(core, invite())
    assert parse(data).get(b"x-trace") is not None and parse(data).get(b"traceparent") is None


def test_no_record_route_switch():
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, record_route=False))
    data, _ = forward_one(core, invite())
    assert parse(data).get(b"record-route") is None


def test_in_dialog_request_from_signaling_follows_route_then_ruri(core):
    bye = (b"BYE sip:alice@10.0.0.1:5070 SIP/2.0\r\n"
           b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-sig-bye\r\n"
           b"Route: <sip:10.0.0.2:5060;lr>\r\n"
           b"From: <sip:+15551234567@10.0.0.3>;tag=uas-1\r\n"
           b"To: <sip:+15557654321@10.0.0.1>;tag=from-1\r\n"
           b"Call-ID: call-9\r\nCSeq: 5 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    forward_one(core, invite())  # the gateway has talked to us: an allowed next hop
    data, dest = forward_one(core, bye, src=SIGNALING)
    assert dest == ("10.0.0.1", 5070)
    assert parse(data).get(b"route") is None
    assert core.stats.requests[METHOD_INDEX[b"BYE"] * 2 + FROM_SIGNALING] == 1


@pytest.mark.parametrize("route", [b"<sip:10.0.0.2:5060;lr>", b"<sip:10.0.0.2:5060;lr>, <sip:10.0.0.2;lr>"])
def test_our_route_above_the_via_line_is_removed_and_every_other_line_kept(core, route):
    """Header order is free (RFC 3261 §7.3.1): a Route line of ours above the Via line is removed,
    and the Via edits still land on the Via line (the line index taken before the removal once
    overwrote the From line with the Via and sent the request without a From)."""
    forward_one(core, invite())
    lines = [b"BYE sip:+15551234567@10.0.0.3:5080 SIP/2.0", b"Route: " + route,
             b"Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-bye",
             b"From: \"Alice\" <sip:+15557654321@10.0.0.1>;tag=from-1",
             b"To: <sip:+15551234567@10.0.0.3>;tag=uas-1", b"Call-ID: call-1@gw", b"CSeq: 2 BYE",
             b"Max-Forwards: 70", b"Content-Length: 0"]
    data, dest = forward_one(core, b"\r\n".join(lines) + b"\r\n\r\n")
    assert dest == SIGNALING
    out = parse(data)
    assert out.get(b"route") is None
    assert out.lines[0].startswith(b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsw")
    assert out.lines[1:8] == [lines[2], *lines[3:7], b"Max-Forwards: 69", b"Content-Length: 0"]
    assert out.names[8:] == [b"traceparent"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(range(9)), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([b"INVITE", b"BYE", b"OPTIONS"]), st.booleans())
def test_every_line_survives_whatever_the_header_order(order, with_route, with_rr, with_mf, method, tcp):
    """Header order is free (RFC 3261 §7.3.1). In any order the forwarded request carries every
    line the proxy does not edit exactly as written and in its order, our Via right above the
    sender's (with Max-Forwards when it was missing and our Record-Route when there was none),
    Max-Forwards one less, and no Route of ours; over UDP and over TCP (where the sender's Via
    gets rport: its responses take the connection, RFC 3261 §18.2.2)."""
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, timer_b=32.0))
    forward_one(core, invite())  # (the call of the BYE; the gateway seen)
    in_dialog = method == b"BYE"
    route, mf, rr = b"Route: <sip:10.0.0.2:5060;lr>", b"Max-Forwards: 70", b"Record-Route: <sip:10.9.9.9;lr>"
    sender_via = b"Via: SIP/2.0/%s 10.0.0.1:5070;branch=z9hG4bK-perm" % (b"TCP" if tcp else b"UDP")
    headers = [sender_via, b"From: <sip:a@10.0.0.1>;tag=from-1",
               b"To: <sip:b@10.0.0.3>" + (b";tag=uas-1" if in_dialog else b""),
               b"Call-ID: call-1@gw" if in_dialog else b"Call-ID: perm-1", b"CSeq: 2 " + method,
               b"Contact: <sip:a@10.0.0.1:5070>", mf if with_mf else b"X-Other: 1",
               route if with_route else b"X-No-Route: 1", rr if with_rr else b"Subject: perm"]
    lines = [headers[i] for i in order]
    start = method + b" sip:b@10.0.0.3:5080 SIP/2.0"
    data = b"\r\n".join([start, *lines, b"Content-Length: 0"]) + b"\r\n\r\n"
    (out, dest), = core.receive_stream(data, GATEWAY, T0) if tcp else core.receive_datagram(data, GATEWAY, T0)
    got = out.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert dest == SIGNALING and got[0] == start
    kept = [ln for ln in lines if ln not in (route, mf, sender_via)] + [b"Content-Length: 0"]
    assert [ln for ln in got if ln in kept] == kept
    assert route not in got and (b"Max-Forwards: 69" in got) == with_mf
    at = got.index(sender_via + (b";rport=5070" if tcp else b""))
    above = [b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKsw"] + ([] if with_mf else [mf])
    if method == b"INVITE" and not with_rr:
        above.append(b"Record-Route: <sip:10.0.0.2:5060;lr;sw=")
    assert [got[at - len(above) + k][:len(a)] for k, a in enumerate(above)] == above
    if method == b"INVITE" and with_rr:
        assert got[got.index(rr) - 1].startswith(b"Record-Route: <sip:10.0.0.2:5060;lr;sw=")
    assert sum(ln.startswith(b"Via:") for ln in got) == 2 and got[-1].startswith(b"traceparent: ")


def test_compact_headers_and_bare_lf(core):
    req = (b"OPTIONS sip:sig@10.0.0.3 SIP/2.0\n"
           b"v: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-c1\n"
           b"f: <sip:gw@10.0.0.1>;tag=a\nt: <sip:sig@10.0.0.3>\ni: compact-1\n"
           b"CSeq: 1 OPTIONS\nl: 0\n\n")
    data, dest = forward_one(core, req)
    assert dest == SIGNALING
    assert parse(data).top_via().host == b"10.0.0.2"
    assert core.stats.requests[METHOD_INDEX[b"OPTIONS"] * 2 + FROM_GATEWAY] == 1


def _first_empty_line_cut(data: bytes) -> tuple[list[bytes], bytes]:
    """RFC 3261 §7 read the slow, obvious way: walk the LFs; the first one followed by CRLF or LF
    ends the header section. Returns (header lines after the start line, unfolded, line ends
    stripped, body)."""
    p = data.find(b"\n")
    while p >= 0:
        if data[p + 1:p + 3] == b"\r\n":
            head, body = data[:p], data[p + 3:]
            break
        if data[p + 1:p + 2] == b"\n":
            head, body = data[:p], data[p + 2:]
            break
        p = data.find(b"\n", p + 1)
    else:
        head, body = data.rstrip(b"\r\n"), b""
    lines: list[bytes] = []
    for line in head.split(b"\n")[1:]:
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            lines[-1] = lines[-1].rstrip(b" \t") + b" " + line.lstrip(b" \t")
        else:
            lines.append(line)
    return lines, body


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"X-A: 1", b"Via: v", b" folded", b"\tfolded", b"CSeq: 1 A"]),
                          st.sampled_from([b"\r\n", b"\n"])), max_size=8),
       st.sampled_from([b"\r\n", b"\n"]),
       st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"b", b" "]), max_size=12).map(b"".join))
def test_header_section_ends_at_the_first_empty_line(lines, blank, tail):
    """However CRLF and bare LF mix (and whatever the body holds: CRLF CRLF, LF LF), the parser
    cuts where the first empty line is, and folds continuation lines into one value."""
    data = b"OPTIONS sip:a@b SIP/2.0\r\n" + b"".join(t + e for t, e in lines) + blank + tail
    if lines and lines[0][0][:1] in (b" ", b"\t"):
        return  # a continuation line before any header: refused, covered elsewhere
    want_lines, want_body = _first_empty_line_cut(data)
    msg = parse(data, check_length=False)
    assert msg.body == want_body
    assert msg.lines == want_lines


def test_stray_response_is_dropped_and_counted(core):
    resp = (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-x\r\n"
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: s\r\nCSeq: 1 INVITE\r\n"
            b"Content-Length: 0\r\n\r\n")
    assert core.receive_datagram(resp, SIGNALING, T0) == []
    assert core.stats.stray_responses == 1


def test_flood_of_unanswered_invites_keeps_state_bounded():
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, max_transactions=500,
                                max_calls=300))
    for i in range(5000):
        core.receive_datagram(invite(branch=b"z9hG4bK-%d" % i, call_id=b"flood-%d" % i),
                              GATEWAY, T0 + i * 0.001)
    assert len(core.tracker.transactions) <= 500
    assert len(core.tracker.calls) <= 300
    assert core.stats.evicted_transactions >= 4500
    assert core.stats.evicted_calls >= 4700


def test_garbage_is_counted_crlf_keepalive_is_not_an_error(core):
    assert core.receive_datagram(b"\r\n\r\n", GATEWAY, T0) == []
    assert core.stats.keepalives == 1 and core.stats.parse_errors == 0
    assert core.receive_datagram(b"\x00\xff garbage", GATEWAY, T0) == []
    bad_len = invite().replace(b"Content-Length: %d" % len(SDP), b"Content-Length: 9999")
    # RFC 3261 §18.3: a request whose body is shorter than its Content-Length gets a 400
    out = core.receive_datagram(bad_len, GATEWAY, T0)
    assert len(out) == 1 and out[0][0].startswith(b"SIP/2.0 400 ") and out[0][1] == GATEWAY
    assert core.stats.parse_errors == 2


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data):
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    out = core.receive_datagram(data, GATEWAY, T0)
    assert isinstance(out, list)
    assert core.stats.parse_errors + core.stats.keepalives + sum(core.stats.requests) + \
        sum(core.stats.responses) >= 1


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 600), st.binary(min_size=1, max_size=8), st.binary(max_size=1500))
def test_mutated_invites_never_raise_and_bodies_pass_untouched(pos, junk, body):
    core = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    good = invite(body=body)
    out = core.receive_datagram(good, GATEWAY, T0)
    assert len(out) == 1 and out[0][0].endswith(b"\r\n\r\n" + body)
    mutated = good[:pos] + junk + good[pos + len(junk):]
    assert isinstance(core.receive_datagram(mutated, GATEWAY, T0 + 1), list)


def test_observer_labels_directions_and_status_classes_like_the_proxy():
    """Passive observation of one hop counts into the same Stats slots the proxy uses."""
    from sipwatch.observer import Observer
    obs = Observer(signaling=SIGNALING)
    req = invite()
    obs.feed(req, GATEWAY, SIGNALING, T0)
    obs.feed(response_to(req, 486, b"Busy Here"), SIGNALING, GATEWAY, T0 + 0.02)
    proxy = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING))
    fwd, _ = forward_one(proxy, req)
    proxy.receive_datagram(response_to(fwd, 486, b"Busy Here"), SIGNALING, T0 + 0.02)
    assert obs.stats.requests == proxy.stats.requests
    assert obs.stats.responses == proxy.stats.responses
    assert obs.stats.calls == proxy.stats.calls and obs.stats.calls[REJ4] == 1
    assert obs.stats.ring.rtt[0] == pytest.approx(proxy.stats.ring.rtt[0]) == pytest.approx(20.0)


def test_comma_separated_vias_and_folded_headers(core):
    """A response whose Vias share one line (ours first) and a folded header: ours is removed,
    the rest of the line stays, the folded value is read whole."""
    fwd, _ = forward_one(core, invite())
    msg = parse(fwd)
    vias = msg.get_all(b"via")
    assert len(vias) == 2
    resp = (b"SIP/2.0 180 Ringing\r\n"
            b"Via: " + vias[0] + b" ,\r\n " + vias[1] + b"\r\n"
            b"From: \"Alice\" <sip:+15557654321@10.0.0.1>;tag=from-1\r\n"
            b"To: <sip:+15551234567@10.0.0.3>;tag=uas-1\r\n"
            b"Call-ID: call-1@gw\r\nCSeq: 1\r\n\tINVITE\r\nContent-Length: 0\r\n\r\n")
    out = core.receive_datagram(resp, SIGNALING, T0 + 0.03)
    assert len(out) == 1
    data, dest = out[0]
    assert dest == GATEWAY
    left = parse(data).get_all(b"via")
    assert len(left) == 1 and left[0].startswith(b"SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-1")
    assert core.stats.ring.n == 1 and core.stats.ring.rtt[0] == pytest.approx(30.0)


def test_a_key_set_later_is_the_one_both_mac_paths_use(monkeypatch):
    """A proxy given its key after start (a restarted one handed the old key) makes its branch and
    Record-Route MACs under that key: with the C MAC, and with hashlib's (a build without the
    extension, or SIPWATCH_NO_C=1), which had kept the first key."""
    from binascii import hexlify
    from hashlib import blake2b

    from sipwatch import core as core_module

    def ref(key: bytes, data: bytes) -> bytes:
        return hexlify(blake2b(data, key=key, digest_size=6).digest())
    for c_path in ([True] if core_module._c_mac_hex is not None else []) + [False]:
        if not c_path:
            monkeypatch.setattr(core_module, "_c_mac_hex", None)  # (a compiled core keeps its own)
        proxy = ProxyCore(CoreConfig(advertise=("127.0.0.1", 5070), upstream=("127.0.0.1", 5080), secret=b"s3cret"))
        first = proxy.key
        assert proxy._party_mac("10.0.0.1") == ref(first, b"r|10.0.0.1")
        proxy.key = bytes(32)
        assert proxy._party_mac("10.0.0.1") == ref(bytes(32), b"r|10.0.0.1")
        assert proxy._mac_of((b"b", b"z9hG4bK-1", b"call-1@gw")) == ref(bytes(32), b"b|z9hG4bK-1|call-1@gw")


def test_a_response_whose_next_via_was_written_anew_is_still_accounted(core):
    """The next hop may write the Via below ours anew: parameters spaced, reordered, equal by
    RFC 3261 §20.42 but not byte for byte. The response was relayed (its branch MAC holds) but
    not accounted to its transaction: no RTT, the INVITE timed out, the answered call counted
    as a timeout."""
    fwd, _ = forward_one(core, invite(branch=b"z9hG4bK-gw-r;x=1"))
    ok = response_to(fwd, 200).replace(b"SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK-gw-r;x=1",
                                      b"SIP/2.0/UDP 10.0.0.1:5070 ; x=1 ; branch=z9hG4bK-gw-r")
    assert b" ; x=1 ; branch=z9hG4bK-gw-r" in ok
    out, dest = forward_one(core, ok, SIGNALING, T0 + 0.03)
    assert dest == GATEWAY and out.startswith(b"SIP/2.0 200 ")
    ring = core.stats.ring
    assert ring.n == 1 and ring.rtt[0] == pytest.approx(30.0)
    assert core.stats.calls[ANSWERED] == 1
    core.tracker.expire(T0 + 60)
    assert core.stats.timeouts[INVITE] == 0 and core.stats.calls[TIMEOUT] == 0


def test_a_restarted_sidecar_keeps_a_dialogs_later_requests_in_its_trace():
    """A sidecar restarted with the same secret carries on the calls set up before it, but gave
    their later requests (the callee's BYE) a new random trace: one call, two traces (a
    trace-checking callee answered 500). A dialog's trace id is now its Call-ID under the key;
    requests outside a dialog keep random ones (a pinging gateway reusing one Call-ID must not
    make one endless trace), and another key gives another id."""
    from test_tcp_core import callee_routes, in_dialog

    def trace_of(data):
        return parse_traceparent(parse(data).get(b"traceparent"))[0]

    def sidecar(secret):
        return ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, timer_b=32.0, secret=secret))

    before = sidecar(b"same-key")
    fwd, _ = forward_one(before, invite())
    forward_one(before, response_to(fwd, 200), SIGNALING, T0 + 0.05)
    after = sidecar(b"same-key")  # the restart: nothing of the call is known
    bye = in_dialog(b"BYE", callee_routes(fwd), b"<sip:alice@10.0.0.1:5070>",
                    b"SIP/2.0/UDP 10.0.0.3:5080;branch=z9hG4bK-uas-bye9", call_id=b"call-1@gw", swap=True)
    out, dest = forward_one(after, bye, SIGNALING, T0 + 60)
    assert dest == GATEWAY and trace_of(out) == trace_of(fwd)
    other = sidecar(b"other-key")
    fwd2, _ = forward_one(other, invite())
    assert trace_of(fwd2) != trace_of(fwd)
    opt = invite(method=b"OPTIONS", call_id=b"ping-1", body=b"")
    a, _ = forward_one(before, opt, GATEWAY, T0 + 1)
    b, _ = forward_one(after, opt, GATEWAY, T0 + 1)
    assert trace_of(a) != trace_of(b)


def test_a_dialogs_trace_id_is_the_same_with_and_without_the_c_scan(monkeypatch):
    from sipwatch import core as core_module
    c = ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, secret=b"k"))
    ids = [c._dialog_trace_id(b"call-%d@gw" % i) for i in range(50)]
    monkeypatch.setattr(core_module, "_c_mac_hex", None)
    assert [c._dialog_trace_id(b"call-%d@gw" % i) for i in range(50)] == ids
    assert len(set(ids)) == 50 and all(0 < i < 1 << 128 for i in ids)


@pytest.mark.parametrize("fast", [True, False])
def test_max_forwards_with_leading_zeros_is_its_number(core, fast, monkeypatch):
    """Max-Forwards is 1*DIGIT (RFC 3261 §25.1): "0070" is 70, and was answered 400 Bad
    Max-Forwards; "0000" is 0 (483), a long run of zeros costs one pass."""
    from sipwatch import core as core_module
    if not fast:
        monkeypatch.setattr(core_module, "_c_request_fields", None)
    data, dest = forward_one(core, invite(max_forwards=b"0070"))
    assert dest == SIGNALING and parse(data).get(b"max-forwards") == b"69"
    out = core.receive_datagram(invite(max_forwards=b"0000", call_id=b"mf0@gw"), GATEWAY, T0)
    assert parse(out[0][0]).status == 483
    out = core.receive_datagram(invite(max_forwards=b"0" * 20000 + b"1", call_id=b"mf1@gw"), GATEWAY, T0)
    assert parse(out[0][0]).method == b"INVITE" and parse(out[0][0]).get(b"max-forwards") == b"0"

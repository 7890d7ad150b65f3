"""B2BUA leg correlation in the sans-IO core and the observer: which new dialogs join which call.

Header values follow RFC 7989 §6 and its examples (Session-ID UUID pairs, the null UUID while
the remote end is unknown), RFC 7315 (P-Charging-Vector icid-value) and Homer's X-CID. The
trace context a leg gets is read back from the bytes the core forwards.
"""
from __future__ import annotations

import pytest

from sipwatch.correlation import icid_key, parse_kinds, session_id_key, xcid_key
from sipwatch.core import CoreConfig, ProxyCore
from sipwatch.logs import call_summary_fields
from sipwatch.masking import CallIdMasker
from sipwatch.observer import Observer
from sipwatch.sipmsg import parse
from sipwatch.state import MAX_LEGS
from sipwatch.stats import CORRELATION_RESULTS
from sipwatch.tracecontext import parse_traceparent
from test_core import GATEWAY, SIDECAR, SIGNALING, T0, invite, response_to

# RFC 7989 §10.1: Alice's UUID, Bob's UUID, the null UUID
ALICE, BOB, NULL = b"ab30317f1a784dc48ff824d0d3715d86", b"47755a9de7794ba387653f2099600ef2", b"0" * 32
OTHER_GATEWAY = ("10.0.0.9", 5070)


def core(**kw) -> ProxyCore:
    return ProxyCore(CoreConfig(advertise=SIDECAR, upstream=SIGNALING, **kw))


def leg_b(call_id=b"leg-b@sig", extra=b"", branch=b"z9hG4bK-sig-1") -> bytes:
    """The B2BUA's outbound leg: a new dialog from signaling towards the gateway side."""
    head = [b"INVITE sip:+15551234567@10.0.0.1:5070 SIP/2.0",
            b"Via: SIP/2.0/UDP 10.0.0.3:5080;branch=" + branch,
            b"From: <sip:b2bua@10.0.0.3>;tag=b-1", b"To: <sip:+15551234567@10.0.0.1>",
            b"Call-ID: " + call_id, b"CSeq: 1 INVITE", b"Max-Forwards: 70"]
    if extra:
        head.append(extra)
    head.append(b"Content-Length: 0")
    return b"\r\n".join(head) + b"\r\n\r\n"


def stamped(out) -> tuple[int, int, int]:
    """(trace id, span id, flags) of the traceparent in a forwarded request."""
    (data, _), = out
    return parse_traceparent(parse(data).get(b"traceparent"))


def counts(c: ProxyCore, kind: str) -> dict:
    i = ("x-cid", "session-id", "icid").index(kind)
    return dict(zip(CORRELATION_RESULTS, c.stats.correlation[i * 4:i * 4 + 4]))


def test_header_values_as_the_rfcs_write_them():
    # RFC 7989: the pair is order-free and case-insensitive, the null remote UUID stands alone
    assert session_id_key(ALICE + b";remote=" + NULL) == session_id_key(ALICE) == b"s:" + ALICE
    assert session_id_key(ALICE + b";remote=" + BOB) == session_id_key(BOB.upper() + b" ; remote=" + ALICE)
    assert session_id_key(ALICE + b";remote=" + BOB) != session_id_key(ALICE)
    for bad in (NULL + b";remote=" + ALICE, ALICE[:-1], ALICE + b"0", b"g" * 32, ALICE + b";remote=xyz",
                ALICE + b";remote", b"", ALICE + b";x=" + b"1" * 300):
        assert session_id_key(bad) == b"", bad
    # RFC 7315 example; quoted values; no icid-value is no key
    assert icid_key(b"icid-value=1234bc9876e;icid-generated-at=192.0.6.8;orig-ioi=home1.net") == b"i:1234bc9876e"
    assert icid_key(b'ICID-Value="AyretyU0dm+6O2IrT5tAFrbHLso=023551024"') == b"i:AyretyU0dm+6O2IrT5tAFrbHLso=023551024"
    assert icid_key(b"orig-ioi=home1.net") == icid_key(b'icid-value=""') == b""
    assert xcid_key(b"  a84b4c76e66710@pc33.atlanta.com ") == b"a84b4c76e66710@pc33.atlanta.com"
    assert xcid_key(b"a b") == xcid_key(b"x" * 257) == xcid_key(b"") == b""
    assert parse_kinds("x-cid, Session-ID,P-Charging-Vector") == (0, 1, 2) and parse_kinds("none") == ()
    with pytest.raises(ValueError, match="X-Foo"):
        parse_kinds("X-CID,X-Foo")


def test_x_cid_from_signaling_joins_leg_a_trace_as_a_child():
    c = core()
    leg_a = c.receive_datagram(invite(call_id=b"leg-a@gw"), GATEWAY, T0)
    trace_a, span_a, _ = stamped(leg_a)
    out = c.receive_datagram(leg_b(extra=b"X-CID: leg-a@gw"), SIGNALING, T0 + 0.040)
    assert out[0][1] == GATEWAY
    trace_b, span_b, flags = stamped(out)
    assert trace_b == trace_a and span_b != span_a and flags == 1
    a, b = c.tracker.calls[b"leg-a@gw"], c.tracker.calls[b"leg-b@sig"]
    assert b.parent_span_id == a.span_id == b.gap_parent and b.gap_span_id not in (0, a.span_id, b.span_id)
    assert (a.leg, b.leg, b.joined_by, a.joined_by) == (1, 2, "x-cid", None)
    assert b.t_start - b.gap_start == pytest.approx(0.040)
    assert counts(c, "x-cid") == {"joined": 1, "unmatched": 0, "refused": 0, "malformed": 0}
    # the later requests of leg B stay in that trace (in-dialog: no correlation look-up at all)
    fwd = out[0][0]
    c.receive_datagram(response_to(fwd, 200), GATEWAY, T0 + 0.1)
    ack = leg_b(extra=b"X-CID: leg-a@gw").replace(b"INVITE sip", b"ACK sip").replace(
        b"CSeq: 1 INVITE", b"CSeq: 1 ACK").replace(b"To: <sip:+15551234567@10.0.0.1>",
                                                   b"To: <sip:+15551234567@10.0.0.1>;tag=uas-1")
    assert stamped(c.receive_datagram(ack, SIGNALING, T0 + 0.2))[0] == trace_a
    assert counts(c, "x-cid")["joined"] == 1
    # both summaries: same correlation id, both legs; masked like Call-IDs are
    masker = CallIdMasker("hash", b"k")
    for call, leg in ((a, 1), (b, 2)):
        f = call_summary_fields(call, call_id_mask=masker)
        assert f["correlation_id"] == masker(b"leg-a@gw") and f["leg"] == leg
        assert f["legs"] == [masker(b"leg-a@gw"), masker(b"leg-b@sig")]
        assert "leg-a" not in repr(f)
    assert call_summary_fields(b)["b2bua_leg_setup_ms"] == pytest.approx(40.0)


def test_what_may_not_join_starts_a_trace_of_its_own():
    c = core()
    trace_a = stamped(c.receive_datagram(invite(call_id=b"leg-a@gw"), GATEWAY, T0))[0]
    cases = [
        # another party on the gateway side naming the call: its INVITE did not come from where
        # leg A's went, so it is not the B2BUA's leg
        (invite(call_id=b"rogue@gw2", branch=b"z9hG4bK-r", extra=b"X-CID: leg-a@gw"), OTHER_GATEWAY, "refused"),
        (leg_b(b"b1@sig", b"X-CID: nobody@gw", b"z9hG4bK-1"), SIGNALING, "unmatched"),
        (leg_b(b"b2@sig", b"X-CID: " + b"x" * 300, b"z9hG4bK-2"), SIGNALING, "malformed"),
        (leg_b(b"b3@sig", b"X-CID: b3@sig", b"z9hG4bK-3"), SIGNALING, "unmatched"),  # names itself
    ]
    for data, src, result in cases:
        out = c.receive_datagram(data, src, T0 + 0.01)
        assert stamped(out)[0] != trace_a, result
        assert counts(c, "x-cid")[result] >= 1, result
    assert c.tracker.calls[b"leg-a@gw"].group is None
    # a call that ended takes no further legs
    c2 = core()
    fwd = c2.receive_datagram(invite(call_id=b"done@gw"), GATEWAY, T0)[0][0]
    c2.receive_datagram(response_to(fwd, 486, b"Busy Here"), SIGNALING, T0 + 0.01)
    out = c2.receive_datagram(leg_b(extra=b"X-CID: done@gw"), SIGNALING, T0 + 0.02)
    assert counts(c2, "x-cid")["refused"] == 1 and c2.tracker.calls[b"leg-b@sig"].group is None
    # correlation off: the header is not even read
    c3 = core(correlation_headers="none")
    c3.receive_datagram(invite(call_id=b"leg-a@gw"), GATEWAY, T0)
    c3.receive_datagram(leg_b(extra=b"X-CID: leg-a@gw"), SIGNALING, T0 + 0.01)
    assert sum(c3.stats.correlation) == 0 and c3.tracker.calls[b"leg-b@sig"].group is None


def test_session_id_pair_and_icid_join_and_a_group_is_bounded():
    c = core(correlation_headers="Session-ID,P-Charging-Vector")
    sid_a = b"Session-ID: " + ALICE + b";remote=" + NULL
    trace_a = stamped(c.receive_datagram(invite(call_id=b"a@gw", extra=sid_a), GATEWAY, T0))[0]
    # the B2BUA passes the Session-ID on unchanged (RFC 7989 §6); X-CID is not configured here
    out = c.receive_datagram(leg_b(b"b@sig", sid_a + b"\r\nX-CID: nobody"), SIGNALING, T0 + 0.01)
    assert stamped(out)[0] == trace_a and c.tracker.calls[b"b@sig"].joined_by == "session-id"
    # the pair in the other order (e.g. a B2BUA placing a leg after the answer) is the same pair
    sid_ab, sid_ba = (b"Session-ID: %s;remote=%s" % p for p in ((ALICE, BOB), (BOB, ALICE)))
    trace_x = stamped(c.receive_datagram(invite(call_id=b"x@gw", branch=b"z9hG4bK-x", extra=sid_ab),
                                         GATEWAY, T0))[0]
    assert stamped(c.receive_datagram(leg_b(b"y@sig", sid_ba, b"z9hG4bK-y"), SIGNALING, T0 + 0.01))[0] == trace_x
    # icid: one value for the charging session across B2BUAs
    pcv = b"P-Charging-Vector: icid-value=1234bc9876e;orig-ioi=home1.net"
    trace_i = stamped(c.receive_datagram(invite(call_id=b"i@gw", branch=b"z9hG4bK-i", extra=pcv), GATEWAY, T0))[0]
    out = c.receive_datagram(leg_b(b"j@sig", pcv, b"z9hG4bK-j"), SIGNALING, T0 + 0.01)
    assert stamped(out)[0] == trace_i and c.tracker.calls[b"j@sig"].joined_by == "icid"
    # at most MAX_LEGS legs in one call; the rest start their own traces, counted refused
    for k in range(MAX_LEGS + 3):
        c.receive_datagram(leg_b(b"m%d@sig" % k, sid_a, b"z9hG4bK-m%d" % k), SIGNALING, T0 + 0.02)
    group = c.tracker.calls[b"a@gw"].group
    assert len(group.call_ids) == MAX_LEGS
    assert counts(c, "session-id")["refused"] == MAX_LEGS + 3 - (MAX_LEGS - 2)  # a@gw and b@sig were in


def test_a_session_id_carried_into_a_call_of_its_own_names_nobody():
    """A callee learns the caller's Session-ID from the call. Its own INVITE carrying it was
    refused, but the B2BUA passes Session-ID on, so the leg it placed for that call came from
    the B2BUA with the key and joined the victim's call and trace (14 such calls filled its
    group). Now a key another dialog outside the call's legs carried names nobody; the call's
    later legs still join by X-CID."""
    c = core()
    sid = b"Session-ID: " + ALICE + b";remote=" + NULL
    trace_v = stamped(c.receive_datagram(invite(call_id=b"victim@gw", extra=sid), GATEWAY, T0))[0]
    assert stamped(c.receive_datagram(leg_b(b"vb@sig", sid, b"z9hG4bK-vb"), SIGNALING, T0 + 0.01))[0] == trace_v
    evil = invite(call_id=b"evil@gw2", branch=b"z9hG4bK-e", extra=sid)
    assert stamped(c.receive_datagram(evil, OTHER_GATEWAY, T0 + 0.02))[0] != trace_v
    for k in range(MAX_LEGS):  # the B2BUA's legs of the attacker's calls
        out = c.receive_datagram(leg_b(b"eb%d@sig" % k, sid, b"z9hG4bK-eb%d" % k), SIGNALING, T0 + 0.03)
        assert stamped(out)[0] != trace_v
        assert c.tracker.calls[b"eb%d@sig" % k].group is None
    assert c.tracker.calls[b"victim@gw"].group.call_ids == [b"victim@gw", b"vb@sig"]
    out = c.receive_datagram(leg_b(b"vc@sig", sid + b"\r\nX-CID: victim@gw", b"z9hG4bK-vc"), SIGNALING, T0 + 0.04)
    assert stamped(out)[0] == trace_v and c.tracker.calls[b"vc@sig"].joined_by == "x-cid"
    assert counts(c, "session-id") == {"joined": 1, "unmatched": 1, "refused": 2 + MAX_LEGS, "malformed": 0}


def test_every_header_present_is_counted_and_long_call_ids_join_no_group():
    """A header after the one that joined was not counted at all (its docstring said each is).
    A leg group keeps every leg's Call-ID after the leg has left the table: a 50-KB Call-ID
    joined 15 times held 30 times the call table's byte cap; Call-IDs over 256 bytes join none."""
    c = core()
    sid = b"Session-ID: " + ALICE
    c.receive_datagram(invite(call_id=b"a@gw", extra=sid), GATEWAY, T0)
    c.receive_datagram(leg_b(b"b@sig", b"X-CID: a@gw\r\n" + sid, b"z9hG4bK-b"), SIGNALING, T0 + 0.01)
    assert counts(c, "x-cid")["joined"] == 1 and counts(c, "session-id")["joined"] == 1
    long_b = b"L" * 257 + b"@sig"
    c.receive_datagram(leg_b(long_b, b"X-CID: a@gw", b"z9hG4bK-l"), SIGNALING, T0 + 0.02)
    assert c.tracker.calls[long_b].group is None and counts(c, "x-cid")["refused"] == 1
    long_a = b"L" * 257 + b"@gw"
    sid2 = b"Session-ID: " + BOB
    c.receive_datagram(invite(call_id=long_a, branch=b"z9hG4bK-la", extra=sid2), GATEWAY, T0)
    c.receive_datagram(leg_b(b"lb@sig", sid2, b"z9hG4bK-lb"), SIGNALING, T0 + 0.01)
    assert c.tracker.calls[b"lb@sig"].group is None and counts(c, "session-id")["refused"] == 1
    assert len(c.tracker.calls[b"a@gw"].group.call_ids) == 2


def test_correlation_index_is_capped_and_leaves_with_its_calls():
    c = core(max_calls=50, timer_b=1.0)
    for k in range(200):  # a flood of distinct Session-IDs: never more keys than calls
        sid = b"Session-ID: %032x;remote=%s" % (k + 1, NULL)
        c.receive_datagram(invite(call_id=b"f%d@gw" % k, branch=b"z9hG4bK-f%d" % k, extra=sid), GATEWAY, T0)
        assert len(c.tracker.corr_index) <= len(c.tracker.calls) <= 50
    assert all(c.tracker.calls.get(call.call_id) is call for call in c.tracker.corr_index.values())
    c.handle_timers(T0 + 5)  # no answer: Timer B ends the calls ...
    c.handle_timers(T0 + 10)  # ... and their linger is over
    assert not c.tracker.calls and not c.tracker.corr_index


def test_trace_header_aliases_in_and_several_stamped():
    # jambonz X-Trace-ID: the trace id is taken, there is no parent span in it
    c = core(trace_header="traceparent,X-Traceparent,X-Trace-ID")
    tid = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    data, _ = c.receive_datagram(invite(extra=b"X-Trace-ID: %032X" % tid), GATEWAY, T0)[0]
    msg = parse(data)
    trace, span, flags = parse_traceparent(msg.get(b"traceparent"))
    assert trace == tid and c.tracker.calls[b"call-1@gw"].parent_span_id is None
    assert msg.get(b"x-traceparent") == msg.get(b"traceparent")
    assert msg.get(b"x-trace-id") == b"%032x" % tid and len(msg.get_all(b"x-trace-id")) == 1
    assert c.stats.traceparent_joined == 1 and c.stats.traceparent_invalid == 0
    # X-Traceparent (jigasi) joins with its parent span; a malformed X-Trace-ID is counted
    c2 = core()
    tp = b"00-%032x-00f067aa0ba902b7-01" % tid
    data, _ = c2.receive_datagram(invite(extra=b"X-Traceparent: " + tp), GATEWAY, T0)[0]
    assert parse_traceparent(parse(data).get(b"traceparent"))[0] == tid
    assert c2.tracker.calls[b"call-1@gw"].parent_span_id == 0x00F067AA0BA902B7
    c2.receive_datagram(invite(call_id=b"z@gw", branch=b"z9hG4bK-z", extra=b"X-Trace-ID: 12"), GATEWAY, T0)
    assert c2.stats.traceparent_invalid == 1


def test_observer_joins_legs_seen_on_the_wire():
    """A capture of leg A (gateway -> B2BUA) and leg B (B2BUA -> gateway) joins them as the proxy
    does; leg B sent from another host than leg A went to does not join."""
    b2bua, gw, elsewhere = ("10.0.0.3", 5060), ("10.0.0.1", 5060), ("10.0.0.7", 5060)
    obs = Observer()
    obs.feed(invite(call_id=b"a@gw"), gw, b2bua, T0)
    obs.feed(leg_b(b"b@sig", b"X-CID: a@gw"), b2bua, gw, T0 + 0.05)
    obs.feed(leg_b(b"c@sig", b"X-CID: a@gw", b"z9hG4bK-c"), elsewhere, gw, T0 + 0.06)
    a, b, other = (obs.tracker.calls[k] for k in (b"a@gw", b"b@sig", b"c@sig"))
    assert b.trace_id == a.trace_id != other.trace_id and b.parent_span_id == a.span_id
    assert b.t_start - b.gap_start == pytest.approx(0.05) and other.group is None
    assert list(a.group.call_ids) == [b"a@gw", b"b@sig"]


def test_leg_spans_match_the_sdk_encoder():
    """The legs' call spans (correlation attributes, a local parent) and the B2BUA leg-setup span,
    encoded directly, are what the SDK's own encoder makes of SpanBuilder's spans; the span
    worker's tuples carry them unchanged."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from sipwatch.span_worker import Rebuilder, call_tuple
    from sipwatch.state import Tracker
    from sipwatch.stats import INVITE, Stats
    from sipwatch.tracing import make_resource
    from test_otlp_encode import pair

    tr = Tracker(Stats(ring_size=64))
    t = 1_764_500_000.5
    frm, to, ruri = b"<sip:+4930123456789@10.0.0.1>;tag=a", b"<sip:+4940987654321@10.0.0.2>", b"sip:x@10.0.0.2"
    a = tr.new_call(b"leg-a-0123456789@gw", 0xAB << 64, 0x11, None, True, t, True, frm, to, ruri)
    b = tr.new_call(b"leg-b@sig", 0xAB << 64, 0x22, 0x11, True, t + 0.05, True, frm, to, ruri)
    tr.join_leg(b, a, "x-cid", 0x33)
    for call, k in ((a, b"a"), (b, b"b")):
        key = (b"z9hG4bK" + k, b"INVITE")
        tr.request(key, INVITE, b"INVITE", 1, call, call.t_start, 0x40 + call.span_id, call.span_id, 0, SIGNALING, True)
        tr.response(key, 200, call.t_start + 0.1, b"tag")
    tr.finish_open_calls(t + 5)
    builder, enc = pair(make_resource("sipwatch", "proxy", {}), "partial", CallIdMasker("digits", b"k"))
    records = [(k, o) for k, o in tr.finished]
    rebuilt = Rebuilder().record(call_tuple(b))[1]
    for legs_of_b in (b, rebuilt):
        spans = [builder.build(k, o) for k, o in records] + [builder.leg_setup_span(legs_of_b)]
        mine = [enc.call(o) if k == "call" else enc.tx(o) for k, o in records] + [enc.leg_setup(legs_of_b)]
        ref = encode_spans(spans)
        got = ExportTraceServiceRequest.FromString(enc.request([p for p, _ in mine]))
        assert got == ref
    gap = got.resource_spans[0].scope_spans[0].spans[-1]
    attrs = {kv.key: kv.value for kv in gap.attributes}
    assert gap.name == "B2BUA leg setup" and gap.kind == 1 and gap.parent_span_id == (0x11).to_bytes(8, "big")
    assert gap.end_time_unix_nano - gap.start_time_unix_nano == pytest.approx(0.05e9, abs=1e3)
    assert attrs["sip.correlated_by"].string_value == "x-cid" and attrs["sip.legs"].int_value == 2
    assert attrs["sip.correlation_id"].string_value == CallIdMasker("digits", b"k")(b"leg-a-0123456789@gw")
    assert "0123456789" not in attrs["sip.correlation_id"].string_value

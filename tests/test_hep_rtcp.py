"""RTCP reports received as HEP type 5 (RTCP as JSON) are tied to their call by the correlation id
and turned into entries of the call summary's ``rtp`` list; what cannot be read is counted.
The JSON is written here as rtpengine and captagent write it (report blocks per source SSRC)."""
from __future__ import annotations

import orjson

from capture.hep_listen import HepReceiver
from capture.hep_rtcp import RtcpReports
from sipwatch.hep import TYPE_RTCP_JSON, encode_hep3


def report(ssrc, source, fraction, lost, jitter, packets=None) -> bytes:
    doc = {"type": 200 if packets is not None else 201, "ssrc": ssrc, "report_count": 1,
           "report_blocks": [{"source_ssrc": source, "highest_seq_no": 1000, "fraction_lost": fraction,
                              "ia_jitter": jitter, "packets_lost": lost, "lsr": 0, "dlsr": 0}]}
    if packets is not None:
        doc["sender_information"] = {"ntp_timestamp_sec": 1, "ntp_timestamp_usec": 2, "octets": 3,
                                     "rtp_timestamp": 4, "packets": packets}
    return orjson.dumps(doc)


def hep(payload: bytes, cid: bytes = b"call-1@host") -> bytes:
    return encode_hep3(payload, ("10.0.0.1", 20000), ("10.0.0.2", 30000), 1700000000.0,
                       payload_type=TYPE_RTCP_JSON, correlation_id=cid)


def test_reports_reach_their_call_summary():
    store = RtcpReports()
    fed = []
    rx = HepReceiver(lambda *a: fed.append(a), on_rtcp=store.add)
    rx.packet(hep(report(111, 222, 12, 3, 40)))
    rx.packet(hep(report(111, 222, 64, 9, 80)))  # later report: more loss, more jitter
    rx.packet(hep(report(222, 111, 0, 0, 16, packets=500)))
    rx.packet(hep(report(333, 444, 1, 1, 1), cid=b"other@host"))
    assert fed == [] and rx.rtcp_received == 4
    entries = {e["ssrc"]: e for e in store.take(b"call-1@host")}
    assert set(entries) == {222, 111}
    e = entries[222]
    assert (e["lost"], e["lost_pct"], e["jitter_max_ms"], e["reports"]) == (9, 25.0, 10.0, 2)
    assert entries[111]["jitter_max_ms"] == 2.0
    assert store.take(b"call-1@host") == []  # handed out once
    assert len(store.take(b"other@host")) == 1


def test_bad_reports_are_counted_and_bounded():
    store = RtcpReports(max_calls=2)
    assert not store.add(b"c", b"{not json")
    assert not store.add(None, report(1, 2, 0, 0, 0))
    assert not store.add(b"c", b"x" * 20000)
    assert not store.add(b"c", b'{"report_blocks": 5}')
    assert not store.add(b"c", b'{"report_blocks": [{"source_ssrc": "a"}]}')
    assert store.malformed == 4
    for i in range(5):
        store.add(b"call-%d" % i, report(1, 2, 0, 0, 0))
    assert len(store.by_call) == 2  # oldest calls forgotten


def test_other_payload_types_are_counted_not_fed():
    rx = HepReceiver(lambda *a: None)  # no RTCP store: type 5 is unsupported here
    rx.packet(hep(report(1, 2, 0, 0, 0)))
    rx.packet(encode_hep3(b"{}", ("10.0.0.1", 1), ("10.0.0.2", 2), 1.0, payload_type=100))
    assert rx.rejected["unsupported_type"] == 2 and rx.received == 0


def test_values_past_the_rtcp_fields_widths_are_clamped_and_the_call_span_still_encodes():
    """RTCP JSON numbers are the sender's: two blocks of packets_lost = 2^64 - 1 made the call's
    summed loss overflow, and its span failed to encode (C and Python paths). Values are now
    held to the RTCP fields' widths (loss: 24 bits signed; jitter, packets: 32 bits), and an
    SSRC past 32 bits is no report's."""
    from sipwatch.observer import Observer
    from sipwatch.otlp_encode import SpanEncoder, record_tuple, rtp_figures

    store = RtcpReports()
    for s in range(2):
        store.add(b"victim", orjson.dumps({"ssrc": 1, "report_blocks": [
            {"source_ssrc": 1000 + s, "packets_lost": 2**64 - 1, "fraction_lost": 1, "ia_jitter": 2**40}]}))
    assert not store.add(b"victim", orjson.dumps({"report_blocks": [
        {"source_ssrc": 2**33, "packets_lost": 1, "fraction_lost": 1, "ia_jitter": 1}]}))
    obs = Observer()
    hdr = b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>"
    obs.feed(b"INVITE sip:b@h SIP/2.0\r\n" + hdr + b"\r\nCall-ID: victim\r\nCSeq: 1 INVITE\r\n\r\n",
             ("1.1.1.1", 5060), ("2.2.2.2", 5060), 1000.0)
    obs.feed(b"SIP/2.0 486 Busy\r\n" + hdr + b";tag=9\r\nCall-ID: victim\r\nCSeq: 1 INVITE\r\n\r\n",
             ("2.2.2.2", 5060), ("1.1.1.1", 5060), 1000.5)
    call = [rec[1] for rec in obs.drain_finished() if rec[0] == "call"][0]
    streams = store.take(b"victim")
    assert sorted(e["lost"] for e in streams) == [2**23 - 1] * 2
    assert all(e["jitter_max_ms"] == round(1000.0 * (2**32 - 1) / 8000, 3) for e in streams)
    call.rtp = rtp_figures((e["packets"], e["lost"], e["jitter_max_ms"], e["mos"]) for e in streams)
    for accelerate in (True, False):
        enc = SpanEncoder({"service.name": "s"}, "1", "partial", None, accelerate=accelerate)
        pbs, lines = [], []
        assert not enc.encode([record_tuple(call, True)], pbs, lines)
        assert pbs


def test_a_report_without_readable_blocks_keeps_nothing_and_evicts_nobody():
    """Validated before anything is kept: junk for a new id pushed out the oldest real call's
    reports, and a non-object block left an empty entry behind."""
    good = orjson.dumps({"report_blocks": [{"source_ssrc": 7, "packets_lost": 3, "fraction_lost": 5,
                                            "ia_jitter": 80}]})
    store = RtcpReports(max_calls=2)
    assert store.add(b"real-1", good) and store.add(b"real-2", good)
    for junk in (b"{}", b"[]", b'{"report_blocks":[1,"x",null]}', b'{"report_blocks":[{"source_ssrc":-1}]}',
                 b"not json", b"3"):
        assert store.add(b"junk", junk) is False
    assert list(store.by_call) == [b"real-1", b"real-2"]
    assert [e["ssrc"] for e in store.take(b"real-1")] == [7]


def test_the_call_reported_least_recently_is_forgotten_first():
    """A long call still getting reports was forgotten first (first in, first out)."""
    rep = orjson.dumps({"report_blocks": [{"source_ssrc": 1}]})
    store = RtcpReports(max_calls=2)
    store.add(b"long-call", rep)
    store.add(b"b", rep)
    store.add(b"long-call", rep)  # reported again: now the most recent
    store.add(b"c", rep)
    assert set(store.by_call) == {b"long-call", b"c"}
    assert store.take(b"long-call")[0]["reports"] == 2


def test_receiver_counts_rtcp_it_could_not_use_as_refused():
    store = RtcpReports()
    rx = HepReceiver(lambda *a: None, b"", on_rtcp=store.add)
    a, b = ("10.0.0.1", 40000), ("10.0.0.2", 40001)
    assert rx.packet(encode_hep3(b"{}", a, b, 1.7e9, payload_type=TYPE_RTCP_JSON, correlation_id=b"c1")) is False
    assert rx.rtcp_received == 0 and rx.rejected["bad_payload"] == 1
    ok = orjson.dumps({"report_blocks": [{"source_ssrc": 1}]})
    assert rx.packet(encode_hep3(ok, a, b, 1.7e9, payload_type=TYPE_RTCP_JSON, correlation_id=b"c1"))
    assert rx.rtcp_received == 1


def test_the_store_exports_what_it_took_and_refused():
    """RtcpReports.reports and .malformed were counted and never exported."""
    from prometheus_client import CollectorRegistry, generate_latest
    store = RtcpReports()
    reg = CollectorRegistry()
    reg.register(store)
    store.add(b"c1", orjson.dumps({"report_blocks": [{"source_ssrc": 1}, {"source_ssrc": 2}]}))
    store.add(b"c1", b"{not json")
    text = generate_latest(reg).decode()
    assert "sipwatch_hep_rtcp_report_blocks_total 2.0" in text
    assert "sipwatch_hep_rtcp_malformed_total 1.0" in text

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

"""RTP quality from live capture: metrics, stream finishing and per-call summaries.

The end-to-end test runs a real SIPp call pair on loopback with RTP from capture/rtpsend.py
(every 10th caller->callee packet never sent, every 7th sent 12 ms late) while
``sipwatch capture`` watches the same ports and a separate dumpcap writes a pcap. The capture's
metrics and call summaries must agree with what ``tshark -z rtp,streams`` reads from that pcap:
tshark is the reference, not our analyzer. The unit test drives the stream finishing and
eviction logic with injected time.
"""
from __future__ import annotations

import io
import shutil
import sys
import time

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pcapbuild as pb
from harness import HAVE_SIPP, ROOT, free_port, metric, one_capture_clock, run_rtp_call_pair, scrape
from capture.live import LiveCapture, RtpMonitor
from capture.record_fixtures import Dumpcap
from capture.tshark_facts import facts
from sipwatch.logs import JsonLog
from sipwatch.rtp import CODEC_LABELS, codec_label
from sipwatch.state import Call
from test_live_capture import Capture

SDP = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 %s\r\nt=0 0\r\n"
       b"m=audio %d RTP/AVP 0 96\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 x-odd-codec/8000\r\n")
A, B = ("10.0.0.1", 4000), ("10.0.0.2", 5000)


def _samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _send(mon: RtpMonitor, src, dst, ssrc, t0, n, drop=(), pt=0, step=0.02):
    for i in range(n):
        if i not in drop:
            mon.analyzer.feed(pb.rtp(100 + i, i * 160, ssrc, pt), src, dst, t0 + i * step)


def test_streams_finish_at_call_end_plus_grace_idle_timeout_eviction_and_stop():
    lc = LiveCapture("lo", "", None, rtp=RtpMonitor(idle_timeout=10.0, grace=2.0, max_streams=3),
                     log=JsonLog(stream=io.BytesIO()))
    mon, reg = lc.rtp, lc.metrics.gateway
    mon.add_sdp(b"call-1", SDP % (b"10.0.0.1", 4000))
    mon.add_sdp(b"call-1", SDP % (b"10.0.0.2", 5000))
    _send(mon, A, B, 1, 100.0, 50, drop={10, 20})  # 2 lost
    _send(mon, B, A, 2, 100.0, 50)
    _send(mon, ("10.9.9.9", 7000), ("10.9.9.8", 7002), 3, 95.0, 5)  # no SDP: no call
    assert {st.call_id for st in mon.analyzer.streams.values()} == {"call-1", None}

    assert mon.tick(105.0) == []
    s = _samples(reg)
    assert metric(s, "rtp_streams_total") == 0 and metric(s, "rtp_streams_active") == 3
    # the untied stream's last packet was at 95.08: idle from 105.08 on (the call's streams
    # from 110.98); idle sweeps run at most once a second (SWEEP), the next one from 106.0
    mon.tick(105.9)
    assert len(mon.analyzer.streams) == 3
    mon.tick(106.0)
    assert len(mon.analyzer.streams) == 2
    s = _samples(reg)
    assert metric(s, "rtp_streams_total", codec="PCMU") == 1 and metric(s, "rtp_packets_total") == 5

    call = Call(b"call-1", 1, 1, None, True, 99.0, 1e9, True)
    mon.call_ended(call, 106.5)
    assert mon.tick(108.49) == [] and len(mon.analyzer.streams) == 2  # grace: 2 s
    (ended, rtp), = mon.tick(108.5)
    assert ended is call and not mon.analyzer.streams
    by_ssrc = {r["ssrc"]: r for r in rtp}
    assert set(by_ssrc) == {"0x00000001", "0x00000002"}
    assert (by_ssrc["0x00000001"]["packets"], by_ssrc["0x00000001"]["lost"]) == (48, 2)
    assert (by_ssrc["0x00000002"]["packets"], by_ssrc["0x00000002"]["lost"]) == (50, 0)
    assert {r["ended"] for r in rtp} == {"call_end"} and {r["codec"] for r in rtp} == {"PCMU"}
    assert by_ssrc["0x00000001"]["mos"] < by_ssrc["0x00000002"]["mos"]
    s = _samples(reg)
    assert metric(s, "rtp_streams_total", codec="PCMU") == 3
    assert metric(s, "rtp_packets_total", codec="PCMU") == 5 + 48 + 50
    assert metric(s, "rtp_packets_lost_total", codec="PCMU") == 2
    assert metric(s, "rtp_mos_count", codec="PCMU") == 3
    assert metric(s, "rtp_mos_bucket", codec="PCMU", le="4.4") == 1  # only the lossy one
    assert metric(s, "rtp_jitter_milliseconds_count", codec="PCMU") == 3
    # the call's SDP endpoints are forgotten with it: later media on them ties to no call
    assert not mon.analyzer.endpoints and not mon.call_endpoints
    _send(mon, A, B, 9, 120.0, 3)
    assert [st.call_id for st in mon.analyzer.streams.values()] == [None]

    # table full (3): each new stream finishes the oldest early and counts an eviction
    _send(mon, A, B, 10, 121.0, 3)
    _send(mon, A, B, 11, 121.0, 3)
    _send(mon, A, B, 12, 121.0, 3)
    _send(mon, A, B, 13, 121.0, 3)
    assert [st.ssrc for st in mon.analyzer.streams.values()] == [11, 12, 13]
    s = _samples(reg)
    assert metric(s, "rtp_stream_evictions_total") == 2 and metric(s, "rtp_streams_active") == 3
    assert metric(s, "rtp_streams_total") == 5

    # stop: everything still open is finished; a call in its grace gets its summary
    mon.add_sdp(b"call-2", SDP % (b"10.0.0.7", 6000))
    _send(mon, ("10.0.0.8", 6002), ("10.0.0.7", 6000), 20, 122.0, 4, pt=96)
    lc.rtp.call_ended(Call(b"call-2", 2, 2, None, True, 121.0, 1e9, True), 123.0)
    lc.finish()
    s = _samples(reg)
    assert metric(s, "rtp_streams_active") == 0 and metric(s, "rtp_streams_total") == 9
    assert metric(s, "rtp_streams_total", codec="other") == 1  # x-odd-codec: never a label itself
    assert metric(s, "rtp_mos_count", codec="other") == 0  # no E-model figures for it
    labels = {dict(ls).get("codec") for (n, ls) in s if n.startswith("rtp_")} - {None}
    assert labels <= set(CODEC_LABELS)
    line = orjson.loads(lc.log.stream.getvalue().splitlines()[-1])
    assert line["event"] == "call_summary" and line["call_sid"] == "call-2"
    assert [(r["ssrc"], r["codec"], r["packets"], r["ended"]) for r in line["rtp"]] == \
        [("0x00000014", "x-odd-codec", 4, "stop")]


def test_codec_labels_are_a_fixed_set():
    assert codec_label("g711U") == codec_label("PCMU") == "PCMU"
    assert codec_label("g711A") == "PCMA" and codec_label("G729") == "G729"
    assert codec_label("speex") == codec_label("") == codec_label("a" * 300) == "other"


# --------------------------------------------------------------------------------------------
CALLS, COUNT, DROP_EVERY = 2, 51, 10  # per call: caller->callee indices 9, 19, 29, 39, 49 dropped
LOST_PER_CALL = 5


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp")
@pytest.mark.skipif(not all(shutil.which(t) for t in ("dumpcap", "tshark", "capinfos")),
                    reason="needs dumpcap, tshark and capinfos")
def test_live_rtp_metrics_and_call_summaries_match_tshark(tmp_path):
    uas, uac, rtp_a, rtp_b = (free_port() for _ in range(4))
    bpf = f"udp and (port {uas} or port {uac} or port {rtp_a} or port {rtp_b})"
    pcap = tmp_path / "run.pcap"
    sender = [sys.executable, str(ROOT / "capture" / "rtpsend.py"), f"127.0.0.1:{rtp_a}",
              f"127.0.0.1:{rtp_b}", str(COUNT), "--drop-every", str(DROP_EVERY),
              "--delay-every", "7", "--delay-ms", "12"]
    cap = Capture(tmp_path, bpf, f"127.0.0.1:{uas}")
    cap.args += ["--rtp-grace", "1"]
    with one_capture_clock(), Dumpcap(pcap, bpf), cap:
        uac_rc, uas_rc, caller, callee = run_rtp_call_pair(tmp_path, uas, uac, rtp_a, rtp_b, CALLS,
                                                           2500, sender)
        assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
        deadline = time.monotonic() + 20
        while True:
            gw = scrape(cap.gw)
            if (metric(gw, "sip_calls_processed_total", outcome="answered") == CALLS
                    and metric(gw, "rtp_streams_total") >= 2 * CALLS
                    and metric(gw, "rtp_streams_active") == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert cap.stop() == 0

    truth = facts(str(pcap))
    streams = truth["rtp_sdp_streams"]  # tshark, streams set up by the SDP it decoded
    assert len(streams) == 2 * CALLS == len(truth["rtp_heur_streams"])
    lossy = [s for s in streams if s["lost"]]
    # the ground truth holds the induced loss, so equality below is not 0 == 0
    assert len(lossy) == CALLS and all(s["lost"] == LOST_PER_CALL for s in lossy)
    assert {s["payload"] for s in streams} == {"g711U"}

    assert metric(gw, "rtp_streams_total", codec="PCMU") == metric(gw, "rtp_streams_total") == len(streams)
    assert metric(gw, "rtp_packets_total", codec="PCMU") == sum(s["pkts"] for s in streams)
    assert metric(gw, "rtp_packets_lost_total", codec="PCMU") == sum(s["lost"] for s in streams)
    assert metric(gw, "rtp_mos_count", codec="PCMU") == len(streams)
    assert metric(gw, "rtp_mos_bucket", codec="PCMU", le="4.4") == len(lossy)  # clean G.711: 4.41
    assert metric(gw, "rtp_jitter_milliseconds_count", codec="PCMU") == len(streams)
    assert metric(gw, "rtp_jitter_milliseconds_sum", codec="PCMU") == pytest.approx(
        sum(s["max_jitter_ms"] for s in streams), rel=0.05, abs=0.05)
    assert metric(gw, "rtp_stream_evictions_total") == 0
    assert metric(gw, "sip_parse_errors_total") == 0  # media did not leak into the SIP path

    summaries = [e for e in cap.events() if e.get("event") == "call_summary"]
    assert len(summaries) == CALLS
    assert len({e["call_sid"] for e in summaries}) == truth["invite_calls"] == CALLS
    want = {s["ssrc"]: s for s in streams}
    got = {}
    for e in summaries:
        assert len(e["rtp"]) == 2, e
        for r in e["rtp"]:
            got[r["ssrc"]] = r
    assert set(got) == set(want)
    for ssrc, w in want.items():
        r = got[ssrc]
        assert (r["codec"], r["packets"], r["lost"], r["ended"]) == ("PCMU", w["pkts"], w["lost"], "call_end")
        assert r["jitter_max_ms"] == pytest.approx(w["max_jitter_ms"], rel=0.05, abs=0.01), ssrc
        assert r["jitter_mean_ms"] == pytest.approx(w["mean_jitter_ms"], rel=0.05, abs=0.01), ssrc
    stopped = [e for e in cap.events() if e.get("event") == "stopped"]
    assert stopped and stopped[0]["rtp_streams"] == len(streams)


def test_a_sender_restarting_its_sequence_numbers_loses_nothing_in_the_metrics():
    """One stream, 50 packets, then the sender restarts its sequence numbers (a media server
    re-anchoring with the same SSRC): nothing lost (RFC 3550 A.1/A.3). Counted as Wireshark's
    Lost column counts (last − first + 1 − received), the metric, the call summary and the span
    read ~29,850 lost."""
    lc = LiveCapture("lo", "", None, rtp=RtpMonitor(idle_timeout=10.0, grace=2.0, max_streams=8),
                     log=JsonLog(stream=io.BytesIO()))
    mon, reg = lc.rtp, lc.metrics.gateway
    mon.add_sdp(b"call-r", SDP % (b"10.0.0.2", 5000))
    for i in range(100):
        seq = 100 + i if i < 50 else 30000 + i
        mon.analyzer.feed(pb.rtp(seq, i * 160, 7, 0), A, B, 100.0 + i * 0.02)
    mon.call_ended(Call(b"call-r", 1, 1, None, True, 99.0, 1e9, True), 103.0)
    (_, rtp), = mon.tick(105.0)
    (entry,) = rtp
    assert entry["packets"] == 100 and entry["lost"] == 0 and entry["lost_pct"] == 0.0
    assert metric(_samples(reg), "rtp_packets_lost_total", codec="PCMU") == 0

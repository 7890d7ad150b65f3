"""Spans from passive capture: ``sipwatch analyze --spans-file`` on recorded fixtures and
``sipwatch capture --otlp-endpoint`` on loopback next to a sidecar exporting to the same receiver.

Ground truth: tshark (packet times, traceparent headers, which SDP set up which RTP stream), the
fixtures' tshark facts files, the traceparent values the callee logged, and the sidecar's own
spans.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from harness import (HAVE_SIPP, ROOT, Sidecar, free_port, metric, one_capture_clock, run_call_pair, run_rtp_call_pair,
                     scrape)
from otlp_receiver import OtlpReceiver
from sipwatch.waterfall import by_trace, load_spans, render_slowest

PCAPS = ROOT / "pcaps"
HAVE_TSHARK = shutil.which("tshark") is not None
needs_tshark = pytest.mark.skipif(not HAVE_TSHARK, reason="tshark not installed")
SERVER, CLIENT = 2, 3
SEP = "\x1f"


def tshark(pcap: Path, display_filter: str, *fields: str) -> list[list[str]]:
    args = ["tshark", "-n", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
            "-E", f"separator={SEP}"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [line.split(SEP) for line in out.splitlines() if line]


def analyze_spans(pcap: Path, tmp_path: Path) -> list:
    spans_file = tmp_path / f"{pcap.stem}.spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    p = subprocess.run([sys.executable, "-m", "sipwatch", "analyze", str(pcap), "--spans-file",
                        str(spans_file)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    assert "dropped 0" in p.stderr, p.stderr
    return load_spans(str(spans_file)), spans_file


def hop_key(call_id, method, cseq, src, dst) -> tuple:
    return (call_id, method, int(cseq), src, dst)


def span_key(s) -> tuple:
    a = s.attributes
    return hop_key(a["sip.call_id"], s.name, a["sip.cseq"], f"{a['client.address']}:{a['client.port']}",
                   f"{a['server.address']}:{a['server.port']}")


def check_call_structure(spans) -> dict:
    """One trace per Call-ID, a SERVER call span at its root, every transaction span under it."""
    calls = {s.attributes["sip.call_id"]: s for s in spans if s.name == "SIP call"}
    for trace_id, trace in by_trace(spans).items():
        (call,) = [s for s in trace if s.name == "SIP call"]
        assert call.kind == SERVER
        for s in trace:
            assert s.attributes["sip.call_id"] == call.attributes["sip.call_id"]
            if s is not call:
                assert s.kind == CLIENT and s.parent_span_id == call.span_id
    assert len(by_trace(spans)) == len(calls)
    assert len({s.span_id for s in spans}) == len(spans)
    return calls


@needs_tshark
def test_analyze_spans_match_tshark_timings_and_rtp_streams(tmp_path):
    pcap = PCAPS / "rtp_loss_jitter.pcap"
    facts = json.loads((PCAPS / "rtp_loss_jitter.facts.json").read_text())
    spans, spans_file = analyze_spans(pcap, tmp_path)
    calls = check_call_structure(spans)
    assert len(calls) == facts["invite_calls"] == 2
    assert '"sipwatch.role","value":{"stringValue":"analyze"}' in spans_file.read_text()

    # per-hop request/response times from tshark
    rows = tshark(pcap, "sip", "frame.time_epoch", "ip.src", "udp.srcport", "ip.dst", "udp.dstport",
                  "sip.Method", "sip.Status-Code", "sip.Call-ID", "sip.CSeq.seq", "sip.CSeq.method")
    truth: dict = {}
    for t, sip, sport, dip, dport, method, status, cid, seq, cmethod in rows:
        t = Decimal(t)
        if method:
            truth.setdefault(hop_key(cid, cmethod, seq, f"{sip}:{sport}", f"{dip}:{dport}"),
                             {"t0": t, "final": t if method == "ACK" else None})
        else:
            tx = truth[hop_key(cid, cmethod, seq, f"{dip}:{dport}", f"{sip}:{sport}")]
            if int(status) >= 200 and tx["final"] is None:
                tx["final"] = t
    rtts = {hop_key(t["call_id"], t["method"], t["cseq"], t["src"], t["dst"]): t["rtt_ms"]
            for t in facts["transactions_list"]}
    txs = [s for s in spans if s.name != "SIP call"]
    assert sorted(map(span_key, txs)) == sorted(truth)  # ACKs included: zero-length spans
    assert {span_key(s) for s in txs if s.name != "ACK"} == set(rtts)
    for s in txs:
        want = truth[span_key(s)]
        assert abs(s.start_ns - int(want["t0"] * 10**9)) <= 50_000, span_key(s)  # 0.05 ms
        assert abs((s.end_ns - s.start_ns) - int((want["final"] - want["t0"]) * 10**9)) <= 50_000
        if s.name != "ACK":
            assert s.attributes["sip.rtt_ms"] == pytest.approx(rtts[span_key(s)], abs=0.05)
    invites = [s for s in txs if s.name == "INVITE"]
    assert all(s.end_ns - s.start_ns > 5_000_000 for s in invites)  # the callee's answer delay

    # RTP: tshark says which SDP (frame -> Call-ID) set up each stream; the facts give its figures
    frame_call = {n: cid for n, cid in tshark(pcap, "sip", "frame.number", "sip.Call-ID")}
    stream_call = {int(ssrc, 16): frame_call[setup]
                   for ssrc, setup in tshark(pcap, "rtp", "rtp.ssrc", "rtp.setup-frame")}
    per_call: dict = {}
    for st in facts["rtp_sdp_streams"]:
        per_call.setdefault(stream_call[int(st["ssrc"], 16)], []).append(st)
    assert set(per_call) == set(calls)
    for cid, streams in per_call.items():
        a = calls[cid].attributes
        assert a["rtp.streams"] == len(streams) == 2
        assert a["rtp.packets"] == sum(st["pkts"] for st in streams)
        assert a["rtp.lost"] == sum(st["lost"] for st in streams) > 0  # the induced loss
        assert a["rtp.jitter_max_ms"] == pytest.approx(max(st["max_jitter_ms"] for st in streams),
                                                       rel=0.05, abs=0.01)
        assert 1.0 <= a["rtp.mos_min"] < 4.41  # below clean G.711: the lossy stream counted

    # the waterfall of an old capture shows its real timings
    waited = {}
    for s in spans:
        if s.kind == 3:  # transaction spans: time spent waiting on the next hop
            waited[s.trace_id] = waited.get(s.trace_id, 0) + s.end_ns - s.start_ns
    text = render_slowest(str(spans_file))
    assert text.startswith(f"trace {max(waited, key=waited.get)} ")
    assert re.search(r"^  INVITE 200 .*\|  100@[\d.]+ 180@[\d.]+$", text, re.M), text


TRACEPARENT = re.compile(r"^traceparent:\s*00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$", re.I)


@needs_tshark
def test_analyze_of_sidecar_traffic_joins_the_sidecars_trace(tmp_path):
    pcap = PCAPS / "sidecar_call.pcap"
    stamped: dict = {}  # call-id -> trace ids in its requests' traceparent headers (tshark)
    first: dict = {}  # call-id -> did its first request carry one
    for cid, hdr in tshark(pcap, "sip.Method", "sip.Call-ID", "sip.msg_hdr"):
        found = [m[1] for line in hdr.split("\\r\\n") if (m := TRACEPARENT.match(line.strip()))]
        first.setdefault(cid, bool(found))
        stamped.setdefault(cid, set()).update(found)
    assert len(stamped) == 2 and all(len(v) == 1 for v in stamped.values())
    assert not any(first.values())  # the caller sent none: the sidecar's hop carries them

    spans, _ = analyze_spans(pcap, tmp_path)
    calls = check_call_structure(spans)
    assert set(calls) == set(stamped)
    for cid, call in calls.items():
        assert {call.trace_id} == stamped[cid]
        assert call.parent_span_id == ""  # joined on a later hop: trace id only
        hops = sorted(span_key(s)[3:] for s in spans if s.trace_id == call.trace_id and s.name == "INVITE")
        assert hops == [("127.0.0.1:36261", "127.0.0.1:36262"), ("127.0.0.1:36262", "127.0.0.1:36260")]


# --------------------------------------------------------------------------------------------
N = 6


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp")
@pytest.mark.skipif(shutil.which("dumpcap") is None, reason="needs dumpcap")
def test_live_capture_spans_share_the_sidecars_trace_ids(tmp_path):
    from test_live_capture import Capture
    from test_tracing import seen_at_callee

    uas_port = free_port()
    with OtlpReceiver() as rx:
        ep = ("--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}")
        with Sidecar(tmp_path, uas_port, *ep) as sc:
            cap = Capture(tmp_path, f"udp port {uas_port}", f"127.0.0.1:{uas_port}")
            cap.args += [*ep, "--rtp-grace", "0.2"]
            with cap:
                uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call_traced", sc.port,
                                                         uas_port, N, rate=20, uas_extra=("-trace_logs",))
                assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
                deadline = time.monotonic() + 15
                while metric(scrape(cap.gw), "sip_call_duration_seconds_count") < N \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert cap.stop() == 0  # flushes the call spans still in their RTP grace
            stopped = [e for e in cap.events() if e.get("event") == "stopped"]
            assert stopped and stopped[0]["spans_exported"] == 4 * N and stopped[0]["spans_dropped"] == 0
        spans = rx.snapshot()  # both stopped: everything has arrived
    proxy = [s for s in spans if s.resource["sipwatch.role"] == "proxy"]
    captured = [s for s in spans if s.resource["sipwatch.role"] == "capture"]
    assert len(proxy) == len(captured) == 4 * N
    callee = seen_at_callee(uas)
    p_traces, c_traces = by_trace(proxy), by_trace(captured)
    assert set(c_traces) == set(p_traces) and len(c_traces) == N
    for trace_id, trace in c_traces.items():
        assert sorted(s.name for s in trace) == ["ACK", "BYE", "INVITE", "SIP call"]
        (call,) = [s for s in trace if s.name == "SIP call"]
        call_id = call.attributes["sip.call_id"]
        (p_invite,) = [s for s in p_traces[trace_id] if s.name == "INVITE"]
        # the capture saw the INVITE the sidecar forwarded: its call hangs under that span
        assert callee[call_id]["INVITE"] == (trace_id, p_invite.span_id, "01")
        assert call.parent_span_id == p_invite.span_id
        assert call.attributes["sip.call.outcome"] == "answered" and call.attributes["rtp.streams"] == 0
        for s in trace:
            if s is not call:
                assert s.parent_span_id == call.span_id and s.attributes["sip.call_id"] == call_id
                assert (s.attributes["client.port"], s.attributes["server.port"]) == (sc.port, uas_port)
        (c_invite,) = [s for s in trace if s.name == "INVITE"]
        assert [e[2]["sip.response.status_code"] for e in c_invite.events] == \
            [e[2]["sip.response.status_code"] for e in p_invite.events]


CALLS, COUNT, DROP_EVERY = 2, 51, 10


@pytest.mark.sipp
@pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp")
@pytest.mark.skipif(not all(shutil.which(t) for t in ("dumpcap", "tshark")), reason="needs dumpcap and tshark")
def test_live_capture_call_spans_carry_rtp_quality_after_the_grace(tmp_path):
    """Real calls with lossy RTP (capture/rtpsend.py), watched by ``sipwatch capture
    --spans-file`` while dumpcap records the same traffic for tshark."""
    from capture.record_fixtures import Dumpcap
    from capture.tshark_facts import facts
    from test_live_capture import Capture

    uas, uac, rtp_a, rtp_b = (free_port() for _ in range(4))
    bpf = f"udp and (port {uas} or port {uac} or port {rtp_a} or port {rtp_b})"
    pcap, spans_file = tmp_path / "run.pcap", tmp_path / "spans.jsonl"
    sender = [sys.executable, str(ROOT / "capture" / "rtpsend.py"), f"127.0.0.1:{rtp_a}",
              f"127.0.0.1:{rtp_b}", str(COUNT), "--drop-every", str(DROP_EVERY)]
    cap = Capture(tmp_path, bpf, f"127.0.0.1:{uas}")
    cap.args += ["--rtp-grace", "0.5", "--spans-file", str(spans_file)]
    with one_capture_clock(), Dumpcap(pcap, bpf), cap:
        uac_rc, uas_rc, caller, callee = run_rtp_call_pair(tmp_path, uas, uac, rtp_a, rtp_b, CALLS,
                                                           1500, sender)
        assert (uac_rc, uas_rc) == (0, 0), caller.errors() + callee.errors()
        # the capture runs on: each call span is written once its grace is over, not at stop
        deadline = time.monotonic() + 15
        while len([s for s in load_spans(str(spans_file)) if s.name == "SIP call"]) < CALLS \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len([s for s in load_spans(str(spans_file)) if s.name == "SIP call"]) == CALLS
        gw = scrape(cap.gw)
        assert metric(gw, "rtp_streams_active") == 0  # a call span only after its streams ended
        assert cap.stop() == 0

    spans = load_spans(str(spans_file))
    calls = check_call_structure(spans)
    truth = facts(str(pcap))
    frame_call = {n: cid for n, cid in tshark(pcap, "sip", "frame.number", "sip.Call-ID")}
    stream_call = {int(ssrc, 16): frame_call[setup]
                   for ssrc, setup in tshark(pcap, "rtp", "rtp.ssrc", "rtp.setup-frame")}
    per_call: dict = {}
    for st in truth["rtp_sdp_streams"]:
        per_call.setdefault(stream_call[int(st["ssrc"], 16)], []).append(st)
    assert set(per_call) == set(calls) and len(calls) == CALLS
    summaries = {e["call_sid"]: e for e in cap.events() if e.get("event") == "call_summary"}
    for cid, streams in per_call.items():
        a = calls[cid].attributes
        assert a["rtp.streams"] == len(streams) == 2
        assert a["rtp.packets"] == sum(st["pkts"] for st in streams)
        assert a["rtp.lost"] == sum(st["lost"] for st in streams) == COUNT // DROP_EVERY
        assert a["rtp.jitter_max_ms"] == pytest.approx(max(st["max_jitter_ms"] for st in streams),
                                                       rel=0.05, abs=0.01)
        assert a["rtp.mos_min"] == min(r["mos"] for r in summaries[cid]["rtp"]) < 4.41


@pytest.mark.parametrize("name", ["tcp_call", "basic_call_rtp"])
def test_captured_spans_name_the_transport_tshark_saw(tmp_path, name):
    pcap = ROOT / "pcaps" / f"{name}.pcap"
    facts = json.loads((ROOT / "pcaps" / f"{name}.facts.json").read_text())
    assert len(facts["sip_transport"]) == 1
    want = facts["sip_transport"][0].lower()
    spans, _ = analyze_spans(pcap, tmp_path)
    assert spans and {s.attributes["network.transport"] for s in spans} == {want}

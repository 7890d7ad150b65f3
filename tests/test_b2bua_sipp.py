"""One call, one trace across B2BUA legs: SIPp as the B2BUA behind a real sidecar.

SIPp caller (gateway side) -> sidecar -> SIPp B2BUA (the upstream, ``uas_b2bua``), which places
leg B back through the sidecar (from signaling, towards the gateway side) to a SIPp callee, with
``X-CID`` = leg A's Call-ID, or leg A's RFC 7989 ``Session-ID`` passed on unchanged.

Ground truth: the trace context the sidecar stamped, as the B2BUA logged it on leg A and the
callee logged it on leg B (SIP as it was on the wire); tshark's reading of a loopback capture
of every hop for the B2BUA's latency; the exported spans at a real OTLP receiver. The B2BUA span
is held between causal bounds: the sidecar's clock read leg A's INVITE after it arrived (tshark:
A in) and before its copy left (A out), and leg B's INVITE between B in and B out, so its length
lies in [B in - A out, B out - A in], however loaded the machine.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import orjson
import pytest

from capture.record_fixtures import Dumpcap
from harness import HAVE_SIPP, ROOT, Sidecar, Sipp, free_port, metric, sipwatch_path
from otlp_receiver import OtlpReceiver
from sipwatch.masking import CallIdMasker
from sipwatch.waterfall import by_trace as trace_rows, load_spans, render_ladder, render_waterfall
from test_tracing import by_trace, one, seen_at_callee, summaries

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)"),
              pytest.mark.skipif(shutil.which("dumpcap") is None or shutil.which("tshark") is None,
                                 reason="needs dumpcap and tshark")]

INTERNAL, SERVER, CLIENT = 1, 2, 3
B2BUA_DELAY_MS = 40  # the B2BUA's pause between leg A's INVITE and placing leg B
SIPP_CLOCK_SLACK_MS = 5  # SIPp's pauses run on a per-loop-turn millisecond clock
# capture timestamps are whole microseconds (one at each end), span times float seconds -> ns
TIMESTAMP_SLACK_S = 5e-6
SPANS_PER_CALL = 9  # per leg: call, INVITE, ACK, BYE; plus the B2BUA leg setup span


def b2bua_calls(tmp_path, n: int, uac_scenario: str, uac_extra=(), sidecar_extra=(), far_extra=()):
    far_port, b2bua_port = free_port(), free_port()
    pcap = tmp_path / "b2bua.pcap"
    spans_file = tmp_path / "spans.jsonl"
    with OtlpReceiver() as rx:
        with Sidecar(tmp_path, b2bua_port, "--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}",
                     "--spans-file", str(spans_file), *sidecar_extra) as sc:
            with Dumpcap(pcap, f"udp port {sc.port}"):
                far = Sipp(tmp_path, "uas_call_traced", far_port, None, n, None, "-trace_logs", *far_extra).start()
                b2bua = Sipp(tmp_path, "uas_b2bua", b2bua_port, None, n, None, "-trace_logs",
                             "-set", "far_port", str(far_port), "-d", str(B2BUA_DELAY_MS)).start()
                time.sleep(0.3)
                uac = Sipp(tmp_path, uac_scenario, free_port(), sc.port, n, 5, "-d", "300", *uac_extra).start()
                try:
                    rcs = (uac.wait(60), b2bua.wait(20), far.wait(20))
                finally:
                    for p in (uac, b2bua, far):
                        p.kill()
                assert rcs == (0, 0, 0), uac.errors() + b2bua.errors() + far.errors()
                sig = sc.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") >= SPANS_PER_CALL * n,
                                  side="signaling", timeout=20)
        spans = rx.snapshot()  # the sidecar has stopped: nothing more can arrive
    return sc, sig, spans, spans_file, pcap, b2bua, far, (sc.port, b2bua_port, far_port)


def seen_at_b2bua(b2bua) -> dict[str, tuple[str, str]]:
    """{leg A Call-ID: (trace id, span id)} of the traceparent leg A's INVITE carried."""
    out = {}
    for f in b2bua.dir.glob("*_logs.log"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "TPA":
                out[parts[1]] = (parts[2], parts[3])
    return out


def initial_invites(pcap) -> dict[tuple[str, int, int], float]:
    """tshark: {(Call-ID, src port, dst port): time of the first copy} of each INVITE without a To-tag."""
    out = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-Y", 'sip.Method == "INVITE" && !sip.to.tag',
         "-T", "fields", "-E", "separator=|", "-e", "frame.time_epoch", "-e", "udp.srcport",
         "-e", "udp.dstport", "-e", "sip.Call-ID"], capture_output=True, text=True, check=True).stdout
    seen: dict = {}
    for line in out.splitlines():
        t, sport, dport, cid = line.split("|")
        seen.setdefault((cid, int(sport), int(dport)), float(t))
    return seen


def analyze(pcap, *extra) -> dict:
    out = subprocess.run([sys.executable, "-m", "sipwatch", "analyze", str(pcap), "--json", "--mask-numbers",
                          "none", *extra], capture_output=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": sipwatch_path()}).stdout
    return orjson.loads(out)


def check_legs(n, by, sc, sig, spans, pcap, b2bua, far, ports, show):
    """Everything both variants must show; ``show`` turns a raw Call-ID into what logs/spans show."""
    sidecar, b2bua_port, far_port = ports
    at_b2bua, at_callee = seen_at_b2bua(b2bua), seen_at_callee(far)
    assert len(at_b2bua) == n and set(at_callee) == set(at_b2bua)  # the callee logs leg A's id: SIPp
    wire = initial_invites(pcap)  # drops what precedes "///" in its [call_id]
    logged = summaries(sc)
    traces = by_trace(spans)
    assert len(spans) == SPANS_PER_CALL * n and len(traces) == n
    gaps = []
    for a_cid, (trace_a, span_a) in at_b2bua.items():
        b_cid = "legb///" + a_cid
        # one trace id on both legs, as written into SIP: leg A at the B2BUA, leg B at the callee
        assert {t for t, _, _ in at_callee[a_cid].values()} == {trace_a}
        trace = traces[trace_a]
        calls = sorted((s for s in trace if s.kind == SERVER), key=lambda s: s.attributes["sip.leg"])
        assert [s.attributes["sip.call_id"] for s in calls] == [show(a_cid), show(b_cid)]
        leg_a, leg_b = calls
        gap = one(trace, kind=INTERNAL)
        assert gap.name == "B2BUA leg setup"
        # leg B's call span and the B2BUA's span are children of leg A's call span
        assert leg_a.parent_span_id == "" and leg_b.parent_span_id == leg_a.span_id == gap.parent_span_id
        assert gap.start_ns == leg_a.start_ns and gap.end_ns == leg_b.start_ns
        for leg, n_leg in ((leg_a, 1), (leg_b, 2)):
            assert leg.attributes["sip.correlation_id"] == show(a_cid)
            assert leg.attributes["sip.leg"] == n_leg and leg.attributes["sip.legs"] == 2
            assert sorted(s.name for s in trace if s.parent_span_id == leg.span_id and s.kind == CLIENT) == \
                ["ACK", "BYE", "INVITE"]
        assert leg_b.attributes["sip.correlated_by"] == by and "sip.correlated_by" not in leg_a.attributes
        inv_a = one([s for s in trace if s.parent_span_id == leg_a.span_id], name="INVITE")
        inv_b = one([s for s in trace if s.parent_span_id == leg_b.span_id], name="INVITE")
        assert span_a == inv_a.span_id and at_callee[a_cid]["INVITE"][1] == inv_b.span_id
        # leg A's INVITE is answered after leg B's: the B2BUA answers once its leg B is answered
        assert inv_a.start_ns < inv_b.start_ns < inv_b.end_ns < inv_a.end_ns
        # the B2BUA's latency between causal bounds read by tshark off the wire
        a_in = next(t for (cid, _, dport), t in wire.items() if cid == a_cid and dport == sidecar)
        a_out = wire[(a_cid, sidecar, b2bua_port)]
        b_in, b_out = wire[(b_cid, b2bua_port, sidecar)], wire[(b_cid, sidecar, far_port)]
        span_s = (gap.end_ns - gap.start_ns) / 1e9
        assert b_in - a_out - TIMESTAMP_SLACK_S <= span_s <= b_out - a_in + TIMESTAMP_SLACK_S, \
            (b_in - a_out, span_s, b_out - a_in)
        assert b_in - a_out >= (B2BUA_DELAY_MS - SIPP_CLOCK_SLACK_MS) / 1000  # the B2BUA's pause is in it
        gaps.append(span_s)
        # both call summaries: same trace, same correlation id, both legs; the joined leg says how
        sa, sb = logged[show(a_cid)], logged[show(b_cid)]
        for s, n_leg in ((sa, 1), (sb, 2)):
            assert s["trace_id"] == trace_a and s["correlation_id"] == show(a_cid)
            assert s["legs"] == [show(a_cid), show(b_cid)] and s["leg"] == n_leg
        assert sb["correlated_by"] == by and "correlated_by" not in sa
        assert sb["b2bua_leg_setup_ms"] == pytest.approx(span_s * 1000, abs=1e-3)
    # bounded metrics: no label per call or per value
    assert metric(sig, "sip_b2bua_leg_setup_seconds_count") == n
    assert metric(sig, "sip_b2bua_leg_setup_seconds_sum") == pytest.approx(sum(gaps), abs=1e-5 * n)
    assert metric(sig, "sip_correlation_total", header=by, result="joined") == n
    assert metric(sig, "sip_correlation_total", result="refused") == 0
    assert metric(sig, "sipwatch_spans_dropped_total") == 0
    return wire


def check_analyze(pcap, wire, by, ports):
    """``sipwatch analyze`` of the same capture joins the same legs; its B2BUA latency is the
    capture's own: leg A's first INVITE on the wire to leg B's first INVITE on the wire."""
    sidecar, b2bua_port, _ = ports
    rep = analyze(pcap)
    calls = {c["call_sid"]: c for c in rep["calls"]}
    a_cids = [c for c in calls if not c.startswith("legb///")]
    assert len(calls) == 2 * len(a_cids)
    for a_cid in a_cids:
        b_cid = "legb///" + a_cid
        ca, cb = calls[a_cid], calls[b_cid]
        assert ca["legs"] == cb["legs"] == [a_cid, b_cid]
        assert ca["correlation_id"] == cb["correlation_id"] == a_cid and ca["trace_id"] == cb["trace_id"]
        assert cb["correlated_by"] == by and cb["leg"] == 2 and ca["leg"] == 1
        a_first = min(t for (cid, _, _), t in wire.items() if cid == a_cid)
        b_first = wire[(b_cid, b2bua_port, sidecar)]
        assert cb["b2bua_leg_setup_ms"] == pytest.approx((b_first - a_first) * 1000, abs=2e-3)


def test_x_cid_joins_leg_b_into_leg_a_trace(tmp_path):
    n = 4
    secret = secrets.token_hex(16)
    sc, sig, spans, spans_file, pcap, b2bua, far, ports = b2bua_calls(
        tmp_path, n, "uac_call", sidecar_extra=("--mask-call-id", "hash", "--secret", secret))
    masker = CallIdMasker("hash", secret.encode())
    wire = check_legs(n, "x-cid", sc, sig, spans, pcap, b2bua, far, ports, lambda cid: masker(cid.encode()))
    # masked everywhere: no Call-ID (hence no X-CID value) in the logs or the spans as written
    written = sc.stdout_path.read_bytes() + spans_file.read_bytes()
    for a_cid in seen_at_b2bua(b2bua):
        assert a_cid.encode() not in written
    check_analyze(pcap, wire, "x-cid", ports)
    # the text waterfall and ladder of a call show both legs and the B2BUA's own time
    trace = trace_rows(load_spans(str(spans_file)))[next(iter(seen_at_b2bua(b2bua).values()))[0]]
    text = render_waterfall(trace)
    assert "legs 2" in text.splitlines()[0]
    assert any(line.startswith("  B2BUA leg setup") for line in text.splitlines()), text
    assert any(line.startswith("  SIP call leg 2") for line in text.splitlines()), text
    assert any(line.startswith("    INVITE 200") for line in text.splitlines()), text
    ladder = render_ladder(trace)
    assert "[leg 1] INVITE" in ladder and "[leg 2] INVITE" in ladder and "B2BUA placed leg 2" in ladder


def test_session_id_pair_joins_legs(tmp_path):
    """Also: --trace-header with two names stamps both (as the callee received them)."""
    n = 3
    prefix = secrets.token_hex(16)[:31]
    sc, sig, spans, spans_file, pcap, b2bua, far, ports = b2bua_calls(
        tmp_path, n, "uac_call_session_id", uac_extra=("-set", "sid_prefix", prefix),
        sidecar_extra=("--mask-call-id", "none", "--trace-header", "traceparent,X-Traceparent"),
        far_extra=("-trace_msg",))
    received = "".join(f.read_text() for f in far.dir.glob("*_messages.log"))
    stamped = re.findall(r"^traceparent: (\S+)", received, re.M)
    assert len(stamped) == 3 * n  # INVITE, ACK, BYE of every leg B
    assert re.findall(r"^X-Traceparent: (\S+)", received, re.M) == stamped
    wire = check_legs(n, "session-id", sc, sig, spans, pcap, b2bua, far, ports, lambda cid: cid)
    assert metric(sig, "sip_correlation_total", header="x-cid") == 0  # leg B carried no X-CID
    # leg A's Session-ID named no call before it: one unmatched per call, leg B's joined
    assert metric(sig, "sip_correlation_total", header="session-id", result="unmatched") == n
    check_analyze(pcap, wire, "session-id", ports)

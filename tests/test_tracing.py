"""OTLP spans from real SIPp calls through real sidecars, received by a real OTLP receiver.

Ground truth: the traceparent values the callee logged (what was really written into SIP), the
sidecar's JSON call summaries, its RTT histogram, and OpenTelemetry's own ratio sampler.
"""
from __future__ import annotations

import re
import socket

import pytest
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

from harness import HAVE_SIPP, Sidecar, Sipp, free_port, metric, run_call_pair
from otlp_receiver import OtlpReceiver
from sipwatch.tracing import resolve_endpoint, sampler_from_env
from sipwatch.waterfall import load_spans, render_slowest

pytestmark = [pytest.mark.sipp, pytest.mark.skipif(not HAVE_SIPP, reason="needs SIPp (Debian sip-tester)")]

SERVER, CLIENT, ERROR = 2, 3, 2
TP_LOG = re.compile(r"^TP (\S+) (INVITE|ACK|BYE) traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")

SIPP_CLOCK_SLACK_MS = 5  # SIPp's pauses run on a per-loop-turn millisecond clock


def seen_at_callee(uas) -> dict[str, dict[str, tuple[str, str, str]]]:
    """{call_id: {method: (trace_id, span_id, flags)}} from the callee's <log> lines."""
    out: dict = {}
    for f in uas.dir.glob("*_logs.log"):
        for line in f.read_text().splitlines():
            m = TP_LOG.match(line.strip())
            if m:
                out.setdefault(m[1], {})[m[2]] = (m[3], m[4], m[5])
    return out


def by_trace(spans) -> dict[str, list]:
    out: dict = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def one(spans, **match):
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.name, s.resource.get("service.name")) for s in spans])
    return found[0]


def summaries(sc) -> dict[str, dict]:
    return {r["call_sid"]: r for r in sc.logs() if r.get("event") == "call_summary"}


def test_one_trace_per_call_matches_sip_logs_and_rtt(tmp_path):
    n = 10
    uas_port = free_port()
    spans_file = tmp_path / "spans.jsonl"
    env = {"OTEL_SERVICE_NAME": "sw-test", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}
    with OtlpReceiver() as rx:
        with Sidecar(tmp_path, uas_port, "--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}",
                     "--spans-file", str(spans_file), env=env) as sc:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call_traced", sc.port,
                                                     uas_port, n, rate=20, uas_extra=("-trace_logs",))
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            sig = sc.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") >= 4 * n,
                              side="signaling")
        spans = rx.snapshot()  # after the sidecar stopped: nothing more can arrive
    assert rx.requests["grpc"] > 0 and rx.requests["http"] == 0
    assert metric(sig, "sipwatch_spans_exported_total") == 4 * n
    assert metric(sig, "sipwatch_spans_dropped_total") == 0
    assert len(spans) == 4 * n and len({s.span_id for s in spans}) == 4 * n

    callee = seen_at_callee(uas)
    logged = summaries(sc)
    traces = by_trace(spans)
    assert len(traces) == n == len(callee) == len(logged)
    for trace_id, trace in traces.items():
        assert sorted(s.name for s in trace) == ["ACK", "BYE", "INVITE", "SIP call"]
        call = one(trace, name="SIP call")
        assert call.kind == SERVER and call.parent_span_id == ""  # SIPp sent no traceparent
        call_id = call.attributes["sip.call_id"]
        assert call.attributes["sip.call.outcome"] == "answered"
        assert "+493012345" not in call.attributes["sip.from"]  # masked
        assert logged[call_id]["trace_id"] == trace_id  # JSON call summary
        for method in ("INVITE", "ACK", "BYE"):
            tx = one(trace, name=method)
            assert tx.kind == CLIENT and tx.parent_span_id == call.span_id
            assert tx.attributes["sip.call_id"] == call_id
            assert call.start_ns <= tx.start_ns <= tx.end_ns <= call.end_ns
            # the id written into SIP is this span's id, in this trace, sampled
            assert callee[call_id][method] == (trace_id, tx.span_id, "01")
        invite = one(trace, name="INVITE")
        assert [e[2]["sip.response.status_code"] for e in invite.events] == [100, 180]
        assert all(invite.start_ns <= e[1] <= invite.end_ns for e in invite.events)
        assert invite.attributes["sip.response.status_code"] == 200 and invite.status_code != ERROR
        assert invite.attributes["sip.cseq"] == 1 and one(trace, name="BYE").attributes["sip.cseq"] == 2
        assert invite.attributes["server.port"] == uas_port
        assert invite.resource["service.name"] == "sw-test"
        assert invite.resource["deployment.environment"] == "test"
        assert invite.resource["host.name"] == socket.gethostname()
        assert invite.resource["sipwatch.role"] == "proxy" and invite.resource["service.instance.id"]

    # transaction spans and the RTT histogram describe the same requests: INVITE RTT runs to the
    # first provisional (the first event), BYE RTT to its final response (the span end)
    inv_ms = sum((one(t, name="INVITE").events[0][1] - one(t, name="INVITE").start_ns) / 1e6
                 for t in traces.values())
    bye_ms = sum(one(t, name="BYE").duration_ms for t in traces.values())
    assert metric(sig, "signaler_rtt_milliseconds_count", method="INVITE") == n
    assert metric(sig, "signaler_rtt_milliseconds_sum", method="INVITE") == pytest.approx(inv_ms, abs=1e-3 * n)
    assert metric(sig, "signaler_rtt_milliseconds_sum", method="BYE") == pytest.approx(bye_ms, abs=1e-3 * n)

    # the OTLP-JSON lines file holds the same spans, and the waterfall shows the slowest call
    def fields(s):
        return (s.trace_id, s.span_id, s.parent_span_id, s.name, s.kind, s.start_ns, s.end_ns,
                tuple(sorted(s.attributes.items())), tuple((e[0], e[1], tuple(e[2].items())) for e in s.events))
    assert sorted(map(fields, load_spans(str(spans_file)))) == sorted(map(fields, spans))
    # "slowest" = waited longest on the next hop: largest sum of transaction (CLIENT) span times
    waited = {}
    for s in spans:
        if s.kind == 3:
            waited[s.trace_id] = waited.get(s.trace_id, 0.0) + s.duration_ms
    slowest = max(waited, key=waited.get)
    text = render_slowest(str(spans_file))
    assert text.splitlines()[0].startswith(f"trace {slowest} ")
    assert re.search(r"^  INVITE 200 .*\|  100@[\d.]+ 180@[\d.]+$", text, re.M), text
    assert re.search(r"^  BYE 200 ", text, re.M) and re.search(r"^  ACK ", text, re.M), text


def test_two_sidecars_in_a_chain_share_one_trace(tmp_path):
    """UAC → hop1 → hop2 → slow UAS: hop2's spans nest under hop1's INVITE span, and the
    callee's delay sits in both INVITE spans before the first response, not in ACK or BYE."""
    n, delay_ms = 4, 300
    uas_port = free_port()
    with OtlpReceiver() as rx:
        ep = ("--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}")
        with Sidecar(tmp_path, uas_port, *ep, env={"OTEL_SERVICE_NAME": "hop2"}) as hop2, \
                Sidecar(tmp_path, hop2.port, *ep, env={"OTEL_SERVICE_NAME": "hop1"}) as hop1:
            uac_rc, uas_rc, uac, uas = run_call_pair(
                tmp_path, "uac_call", "uas_call_traced", hop1.port, uas_port, n, rate=10,
                uas_extra=("-trace_logs", "-d", str(delay_ms)))
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            spans = rx.wait_for(8 * n)
    assert len(spans) == 8 * n
    callee = seen_at_callee(uas)
    logged1, logged2 = summaries(hop1), summaries(hop2)
    traces = by_trace(spans)
    assert len(traces) == n
    for trace_id, trace in traces.items():
        h1 = [s for s in trace if s.resource["service.name"] == "hop1"]
        h2 = [s for s in trace if s.resource["service.name"] == "hop2"]
        assert len(h1) == len(h2) == 4
        call1, call2 = one(h1, name="SIP call"), one(h2, name="SIP call")
        inv1, inv2 = one(h1, name="INVITE"), one(h2, name="INVITE")
        call_id = call1.attributes["sip.call_id"]
        assert call1.parent_span_id == ""
        assert call2.parent_span_id == inv1.span_id  # hop2 joined the id hop1 wrote into SIP
        assert all(s.parent_span_id == call1.span_id for s in h1 if s is not call1)
        assert all(s.parent_span_id == call2.span_id for s in h2 if s is not call2)
        assert logged1[call_id]["trace_id"] == logged2[call_id]["trace_id"] == trace_id
        assert callee[call_id]["INVITE"] == (trace_id, inv2.span_id, "01")
        # hop2's INVITE lies inside hop1's; both calls nest the same way
        assert inv1.start_ns < inv2.start_ns <= inv2.end_ns < inv1.end_ns
        assert call1.start_ns < call2.start_ns <= call2.end_ns < call1.end_ns
        # the callee's delay: before the first response of the INVITE, at both hops
        wait2 = (inv2.events[0][1] - inv2.start_ns) / 1e6
        wait1 = (inv1.events[0][1] - inv1.start_ns) / 1e6
        # SIPp times its pause on a millisecond clock read once per loop turn, so it can answer
        # a little early against a real clock (299.94 ms seen for a 300-ms pause)
        assert delay_ms - SIPP_CLOCK_SLACK_MS <= wait2 <= wait1
        for h in (h1, h2):
            assert one(h, name="BYE").duration_ms < wait2 and one(h, name="ACK").duration_ms == 0


@pytest.mark.parametrize("backend", ["closed", "blackhole"])
def test_backend_down_calls_pass_and_drops_are_counted(tmp_path, backend):
    """Closed: the OTLP port has only a UDP socket bound (TCP refused). Blackhole: a TCP socket
    that listens but never accepts (the connection opens, no answer ever comes)."""
    n = 8
    uas_port = free_port()
    port = free_port()
    kind = socket.SOCK_DGRAM if backend == "closed" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sink:
        sink.bind(("127.0.0.1", port))
        if backend == "blackhole":
            sink.listen(1)
        with Sidecar(tmp_path, uas_port, "--otlp-endpoint", f"127.0.0.1:{port}") as sc:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port,
                                                     uas_port, n, rate=20)
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            assert int(uac.stat()["SuccessfulCall(C)"]) == n
            sig = sc.wait_for(lambda s: metric(s, "sipwatch_spans_dropped_total") >= 4 * n,
                              timeout=20, side="signaling")
            gw = sc.gateway()
            assert sc.proc.poll() is None
        assert sc.proc.returncode == 0  # stopped on SIGTERM without hanging on the exporter
    assert metric(sig, "sipwatch_spans_dropped_total") == 4 * n
    assert metric(sig, "sipwatch_spans_exported_total") == 0
    assert metric(gw, "sip_calls_processed_total", outcome="answered") == n
    assert metric(gw, "sip_retransmissions_total") == 0


def test_sampling_ratio_per_call_never_split(tmp_path):
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG 0.5: a call is exported whole or not at
    all, exactly when OpenTelemetry's own TraceIdRatioBased sampler says so, and the sampled
    flag written into SIP agrees."""
    n = 30
    uas_port = free_port()
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    with OtlpReceiver() as rx:
        with Sidecar(tmp_path, uas_port, "--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}", env=env) as sc:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call_traced", sc.port,
                                                     uas_port, n, rate=30, uas_extra=("-trace_logs",))
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            sc.wait_for(lambda s: metric(s, "sip_calls_processed_total") >= n)
        spans = rx.snapshot()  # the sidecar flushed everything on stop
    callee = seen_at_callee(uas)
    assert len(callee) == n
    reference = TraceIdRatioBased(0.5)
    sampled = set()
    for call_id, seen in callee.items():
        (trace_id, _, flag), = {(t, "", f) for t, _, f in seen.values()}  # one trace, one flag per call
        decision = reference.should_sample(None, int(trace_id, 16), "INVITE").decision
        assert (flag == "01") == (decision == Decision.RECORD_AND_SAMPLE), call_id
        if flag == "01":
            sampled.add(trace_id)
    assert 0 < len(sampled) < n
    traces = by_trace(spans)
    assert set(traces) == sampled
    assert all(sorted(s.name for s in t) == ["ACK", "BYE", "INVITE", "SIP call"] for t in traces.values())


def test_http_protobuf_from_otel_env_and_non_dialog_traces(tmp_path):
    """Endpoint and protocol from the standard OTEL_* variables; OPTIONS are their own traces."""
    n = 5
    uas_port = free_port()
    with OtlpReceiver() as rx:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx.http_port}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        with Sidecar(tmp_path, uas_port, env=env) as sc:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_call", "uas_call", sc.port,
                                                     uas_port, n, rate=20)
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            uas_port2 = free_port()
            sc2 = Sidecar(tmp_path, uas_port2, env=env)
            with sc2:
                r = run_call_pair(tmp_path, "uac_options", "uas_options", sc2.port, uas_port2, 3, rate=10)
                assert r[:2] == (0, 0), r[2].errors() + r[3].errors()
                sc2.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") >= 3, side="signaling")
            sc.wait_for(lambda s: metric(s, "sipwatch_spans_exported_total") >= 4 * n, side="signaling")
        spans = rx.snapshot()
    assert rx.requests["http"] > 0 and rx.requests["grpc"] == 0
    calls = [s for s in spans if s.attributes.get("sip.request.method") != "OPTIONS"]
    options = [s for s in spans if s.name == "OPTIONS"]
    assert len(calls) == 4 * n and len(options) == 3 and len(spans) == 4 * n + 3
    assert set(by_trace(calls)) == {r["trace_id"] for r in summaries(sc).values()}
    # a request outside a dialog: one CLIENT span, its own trace, no call span
    assert len({s.trace_id for s in options}) == 3
    assert all(s.kind == CLIENT and s.parent_span_id == "" and s.attributes["sip.response.status_code"] == 200
               for s in options)


def test_cancelled_and_timed_out_calls(tmp_path):
    """CANCEL: INVITE ends 487 with its 180 as an event, CANCEL and ACK are spans of the same
    call, nothing is an error. Dead upstream: the INVITE span times out and both spans are ERROR."""
    n = 3
    uas_port = free_port()
    with OtlpReceiver() as rx:
        with Sidecar(tmp_path, uas_port, "--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}") as sc:
            uac_rc, uas_rc, uac, uas = run_call_pair(tmp_path, "uac_cancel", "uas_cancel", sc.port,
                                                     uas_port, n, rate=10)
            assert (uac_rc, uas_rc) == (0, 0), uac.errors() + uas.errors()
            cancelled = by_trace(rx.wait_for(4 * n))
        dead = free_port()  # nothing listens: INVITEs time out after Timer B
        with Sidecar(tmp_path, dead, "--timer-b", "1", "--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}") as sc2:
            # -nr: no INVITE retransmissions, which after Timer B would open a new transaction
            Sipp(tmp_path, "uac_call", free_port(), sc2.port, 2, 10, "-nr", "-recv_timeout", "2500").start().wait(30)
            sc2.wait_for(lambda s: metric(s, "sip_calls_processed_total", outcome="timeout") >= 2)
        spans = rx.snapshot()
    assert len(cancelled) == n
    for trace in cancelled.values():
        assert sorted(s.name for s in trace) == ["ACK", "CANCEL", "INVITE", "SIP call"]
        call, invite = one(trace, name="SIP call"), one(trace, name="INVITE")
        assert call.attributes["sip.call.outcome"] == "cancelled" and call.status_code != ERROR
        assert invite.attributes["sip.response.status_code"] == 487 and invite.status_code != ERROR
        assert [e[2]["sip.response.status_code"] for e in invite.events] == [100, 180]
        assert one(trace, name="CANCEL").attributes["sip.response.status_code"] == 200
        assert all(s.parent_span_id == call.span_id for s in trace if s is not call)
    timed_out = by_trace(s for s in spans if s.trace_id not in cancelled)
    assert len(timed_out) == 2
    for trace in timed_out.values():
        assert sorted(s.name for s in trace) == ["INVITE", "SIP call"]
        call, invite = one(trace, name="SIP call"), one(trace, name="INVITE")
        assert call.attributes["sip.call.outcome"] == "timeout" and call.status_code == ERROR
        assert invite.status_code == ERROR and invite.attributes["error.type"] == "timeout"
        assert invite.events == [] and "sip.response.status_code" not in invite.attributes


@pytest.mark.parametrize("env, expected", [
    ({}, (1.0, True)),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, (0.0, False)),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, (0.0, True)),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, (0.25, False)),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"}, (1.0, True)),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, (1.0, False)),
])
def test_sampler_from_env(env, expected):
    assert sampler_from_env(env) == expected


@pytest.mark.parametrize("flag, proto, env, expected", [
    ("127.0.0.1:4317", "grpc", {}, "http://127.0.0.1:4317"),
    ("collector", "grpc", {}, "http://collector:4317"),
    ("https://c.example:443", "grpc", {}, "https://c.example:443"),
    ("127.0.0.1:4318", "http/protobuf", {}, "http://127.0.0.1:4318/v1/traces"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/otlp/"}, "http://c:4318/otlp/v1/traces"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/x"}, "http://c:9/x"),
    (None, "grpc", {}, None),
])
def test_resolve_endpoint(flag, proto, env, expected):
    assert resolve_endpoint(flag, proto, env) == expected


@pytest.mark.parametrize("sampler, want_flag, want_spans", [("traceidratio", "00", 0),
                                                          ("parentbased_traceidratio", "01", 1)])
def test_the_sampled_flag_a_sidecar_forwards_is_what_its_spans_follow(tmp_path, sampler, want_flag, want_spans):
    """With OTEL_TRACES_SAMPLER=traceidratio at 0 (the deploy's sampler, at a ratio that samples
    nothing) an OPTIONS carrying ``traceparent ...-01`` was forwarded with ``-01`` and recorded
    nowhere: sip-signaling's spans hung under a parent never exported."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(10)
    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gw.bind(("127.0.0.1", 0))
    gw.settimeout(10)
    spans = tmp_path / f"spans-{sampler}.jsonl"
    env = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0"}
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with Sidecar(tmp_path, upstream.getsockname()[1], "--spans-file", str(spans), env=env) as sc:
        gw.sendto(b"OPTIONS sip:svc@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-s1\r\n"
                  b"From: <sip:gw@127.0.0.1>;tag=1\r\nTo: <sip:svc@127.0.0.1>\r\nCall-ID: sampled-1\r\n"
                  b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\ntraceparent: 00-%s-00f067aa0ba902b7-01\r\n"
                  b"Content-Length: 0\r\n\r\n" % (gw.getsockname()[1], trace.encode()), ("127.0.0.1", sc.port))
        req, src = upstream.recvfrom(65535)
        tp = re.search(rb"\r\ntraceparent: 00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})\r\n", req, re.I)
        assert tp is not None and tp.group(1).decode() == trace, req
        assert tp.group(2).decode() == want_flag
        head = req.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        keep = [ln for ln in head if ln.split(b":", 1)[0].lower() in (b"via", b"from", b"to", b"call-id", b"cseq")]
        upstream.sendto(b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\nContent-Length: 0\r\n\r\n", src)
        assert gw.recvfrom(65535)[0].startswith(b"SIP/2.0 200")
    text = spans.read_text() if spans.exists() else ""
    assert text.count(trace) == want_spans, text[:300]
    upstream.close()
    gw.close()

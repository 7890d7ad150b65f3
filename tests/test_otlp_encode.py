"""The direct OTLP encoder against the reference: the SDK's own OTLP encoder run on the spans
:class:`sipwatch.tracing.SpanBuilder` builds from the same records, and the OTLP/JSON writer
that the spans file has always used.

Records come from the real state machine (:class:`sipwatch.state.Tracker`, as the proxy fills
it: proxy-side peers, joined and fresh traces, retransmissions, 1xx events, 5xx, timeouts,
CANCEL, a request outside a dialog) and from every recorded capture in ``pcaps/`` through
``sipwatch analyze``'s code (observer-side peers, TCP, RTP figures on the call span).
The protobuf bytes are decoded with ``opentelemetry-proto``'s generated classes.
"""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from capture.analyze import analyse
from sipwatch import __version__
from sipwatch.demo import free_port
from sipwatch.masking import CallIdMasker
from sipwatch.otlp_encode import CACHE_MAX, SpanEncoder, varint
from sipwatch.state import Tracker
from sipwatch.stats import ACK, BYE, CANCEL, INVITE, OPTIONS, Stats
from sipwatch.tracing import SpanBuilder, make_resource, otlp_json_line

ROOT = Path(__file__).resolve().parent.parent
PCAPS = sorted((ROOT / "pcaps").glob("*.pcap"))
GW, SIG = ("10.0.0.1", 5060), ("192.0.2.10", 65535)
REMOTE = 0x00F067AA0BA902B7


def proxy_records() -> list:
    """Finished records of a set of calls as the proxy's Tracker emits them."""
    tr = Tracker(Stats(ring_size=64), timer_b=4.0)
    t = 1_764_500_000.123456
    span = iter(range(0x1000, 0x100000)).__next__
    frm = '"Jürgen \\"J\\"" <sip:+4930123456789@10.0.0.1>;tag=a1'.encode() + b"\xff\xfe"
    to = b"<sip:+4940987654321@10.0.0.2>"
    ruri = b"sip:+4940987654321@10.0.0.2:5060;user=phone"

    def call(i, parent, status, bye=True, cancel=False, retrans=0):
        c = tr.new_call(b"%d-0123456789@host\n\"x" % i, (0xABC << 100) + i, span(), parent, True,
                        t + i, True, frm, to, ruri)
        key = (b"z9hG4bK%d" % i, b"INVITE")
        inv = tr.request(key, INVITE, b"INVITE", 1, c, t + i, span(), c.span_id, 0, SIG, True)
        tr.response(key, 100, t + i + 0.001)
        tr.response(key, 180, t + i + 0.0123)
        if cancel:
            ck = (b"z9hG4bK%dc" % i, b"CANCEL")
            tr.request(ck, CANCEL, b"CANCEL", 1, c, t + i + 0.02, span(), c.span_id, 0, SIG, False)
            tr.response(ck, 200, t + i + 0.021)
        for _ in range(retrans):
            tr.retransmission(inv)
        tr.response(key, status, t + i + 0.25, b"tag%d" % i)
        tr.ack(ACK, b"ACK", 1, c, t + i + 0.26, span(), 0, SIG)
        if bye and status < 300:
            bk = (b"z9hG4bK%db" % i, b"BYE")
            tr.request(bk, BYE, b"BYE", 2, c, t + i + 3.5, span(), c.span_id, 1, GW, False)
            tr.response(bk, 200, t + i + 3.5042)
        return c

    call(1, 0, 200)
    call(2, REMOTE, 200, retrans=2)  # joined an incoming traceparent
    call(3, 0, 486)
    call(4, REMOTE, 503)
    call(5, 0, 603)
    call(6, 0, 487, cancel=True)
    c = call(7, 0, 200, bye=False)  # answered, never hung up: finished by the shutdown
    # a request outside a dialog: its own trace, parent = the caller's span (remote) or none
    for i, parent in ((8, REMOTE), (9, 0)):
        o = tr.new_call(b"opt-%d" % i, (0xDEF << 100) + i, span(), parent, True, t + i, False, frm, to, ruri)
        key = (b"z9hG4bKo%d" % i, b"OPTIONS")
        tr.request(key, OPTIONS, b"OPTIONS", 99, o, t + i, span(), parent, 0, ("::1", 5070), False)
        tr.response(key, 200, t + i + 0.002)
    # a dead next hop: the INVITE times out (Timer B), the call with it
    d = tr.new_call(b"dead", 0xFEED, span(), 0, True, t + 20, True, frm, to, ruri)
    tr.request((b"z9hG4bKd", b"INVITE"), INVITE, b"INVITE", 2**31 - 1, d, t + 20, span(), d.span_id, 0, SIG, True)
    tr.expire(t + 30)
    tr.finish_open_calls(t + 40)
    assert c.finished
    recs = list(tr.finished)
    kinds = [k for k, _ in recs]
    assert kinds.count("call") == 10 and kinds.count("tx") >= 20
    return recs


class Collector:
    """Stands in for the span pipeline in ``capture.analyze.analyse``: keeps every record."""
    sample_ratio = 1.0

    def __init__(self):
        self.records = []

    def submit(self, records):
        self.records.extend(records)


def capture_records(pcap: Path) -> list:
    col = Collector()
    analyse(str(pcap), spans=col)
    return col.records


def reference(records, builder: SpanBuilder):
    spans = [builder.build(k, o) for k, o in records if k == "tx" or o.is_call]
    return spans, encode_spans(spans)


def encoded(records, enc: SpanEncoder):
    out = [enc.call(o) if k == "call" else enc.tx(o) for k, o in records if k == "tx" or o.is_call]
    return enc.request([p for p, _ in out]), enc.json_line([j for _, j in out])


def pair(resource: Resource, mask="partial", cid=None, accelerate=True):
    return (SpanBuilder(resource, mask, cid),
            SpanEncoder(resource.attributes, __version__, mask, cid, resource.schema_url, accelerate))


def check_same(records, resource, mask="partial", cid=None, accelerate=True):
    builder, enc = pair(resource, mask, cid, accelerate)
    spans, ref = reference(records, builder)
    pb, line = encoded(records, enc)
    got = ExportTraceServiceRequest.FromString(pb)
    assert len(got.resource_spans[0].scope_spans[0].spans) == len(spans) > 0
    for mine, theirs in zip(got.resource_spans[0].scope_spans[0].spans, ref.resource_spans[0].scope_spans[0].spans):
        assert mine == theirs, (mine, theirs)
    assert got == ref
    assert pb == ref.SerializeToString()  # same fields, same order, same bytes
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == orjson.loads(otlp_json_line(spans, resource))
    # a second pass (everything now cached) gives the same bytes
    assert encoded(records, enc) == (pb, line)
    return got


@pytest.mark.parametrize("accelerate", [True, False], ids=["c-if-built", "python"])
@pytest.mark.parametrize("mask", ["partial", "full", "none"])
def test_proxy_records_match_the_sdk_encoder(mask, accelerate):
    """The encoder with its C assembly (sipwatch/_otlpenc.c, when built) and without it."""
    res = make_resource("sw-test", "proxy", {})
    got = check_same(proxy_records(), res, mask, accelerate=accelerate)
    spans = got.resource_spans[0].scope_spans[0].spans
    # the shapes the records were built to show are really there (the test is not vacuous)
    assert {s.flags for s in spans} == {0x100, 0x300}
    assert {s.status.code for s in spans} == {0, 2}
    assert any(len(s.events) == 2 for s in spans) and any(s.parent_span_id == b"" for s in spans)
    names = {s.name for s in spans}
    assert {"SIP call", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"} <= names


def test_call_id_masker_and_resource_from_env():
    env = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=te\"st,k8s.pod.name=p-1"}
    res = make_resource("sipwatch", "proxy", env)
    for mode in ("digits", "hash", "none"):
        check_same(proxy_records(), res, "partial", CallIdMasker(mode, b"secret"))
        check_same(proxy_records(), res, "partial", CallIdMasker(mode, b"secret"), accelerate=False)


@pytest.mark.parametrize("pcap", PCAPS, ids=[p.stem for p in PCAPS])
def test_capture_records_match_the_sdk_encoder(pcap):
    records = capture_records(pcap)
    if not any(k == "tx" or o.is_call for k, o in records):
        pytest.skip("no spans in this capture")
    check_same(records, make_resource("sipwatch", "analyze", {}))


def test_capture_shapes_are_covered():
    """Observer-side peers (client.*), a non-UDP transport and RTP figures appear in the
    fixtures compared above."""
    seen = set()
    for pcap in PCAPS:
        for k, o in capture_records(pcap):
            if k == "tx" and isinstance(o.peer[0], tuple):
                seen.add("client")
                if len(o.peer) > 2 and o.peer[2] != "udp":
                    seen.add("transport")
            if k == "call" and o.rtp:
                seen.add("rtp")
    assert seen == {"client", "transport", "rtp"}


def test_odd_attribute_values_match():
    """RTP figures of every type the encoder takes, edge values included; a key that shadows a
    fixed one keeps its place (as dict.update does)."""
    recs = proxy_records()
    calls = [o for k, o in recs if k == "call" and o.is_call]
    calls[0].rtp = {"rtp.streams": 0, "rtp.packets": 2**63 - 1, "rtp.lost": -5, "rtp.jitter_max_ms": 1e-300,
                    "rtp.mos_min": float("nan"), "rtp.flag": True, "rtp.off": False, "rtp.note": "ä\"\\\x00"}
    calls[1].rtp = {"sip.call.outcome": "overridden", "sip.to": "x", "rtp.streams": 1.0}
    calls[2].rtp = {"rtp.inf": float("-inf"), "rtp.big": -(2**63)}
    res = make_resource("sipwatch", "analyze", {})
    builder, enc = pair(res)
    spans, ref = reference(recs, builder)
    pb, line = encoded(recs, enc)
    assert ExportTraceServiceRequest.FromString(pb) == ref
    # NaN is not equal to itself: compare the JSON as text once decoded and re-encoded
    assert orjson.dumps(orjson.loads(line)) == orjson.dumps(orjson.loads(otlp_json_line(spans, res)))


def test_values_the_encoder_refuses_raise():
    """Out of int64 or of an unknown type: the record raises (the pipeline counts and drops it),
    as the SDK's encoder refuses it too."""
    recs = proxy_records()
    call = next(o for k, o in recs if k == "call" and o.is_call)
    _, enc = pair(make_resource("sipwatch", "proxy", {}))
    for bad in (2**63, -(2**63) - 1, None, object()):
        call.rtp = {"rtp.x": bad}
        with pytest.raises((ValueError, TypeError)):
            enc.call(call)
    call.rtp = None
    enc.call(call)


def test_cache_eviction_keeps_encodings_right():
    """More distinct values than the cache holds: every attribute is still its own value."""
    _, enc = pair(make_resource("sipwatch", "proxy", {}))
    for i in range(CACHE_MAX * 2 + 3):
        pb, js = enc.attr("server.port", i)
        assert orjson.loads(js) == {"key": "server.port", "value": {"intValue": str(i)}}
        assert pb.endswith(b"\x18" + varint(i))
    assert len(enc._int) <= CACHE_MAX
    # bool and int of the same key are never confused (True == 1 in a dict key)
    assert enc.attr("x", 1) != enc.attr("x", True)
    assert enc.attr("x", 1.0) != enc.attr("x", 1)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**64 - 1])
def test_varint(n):
    from google.protobuf.internal.encoder import _VarintBytes
    assert varint(n) == _VarintBytes(n)


def test_big_batch_lengths():
    """A batch longer than 16 KB (multi-byte varint lengths at every level) still decodes."""
    recs = proxy_records() * 40
    builder, enc = pair(make_resource("sipwatch", "proxy", {}))
    spans, ref = reference(recs, builder)
    pb, _ = encoded(recs, enc)
    assert len(pb) > 16384 and ExportTraceServiceRequest.FromString(pb) == ref


# -- the pipeline and its exporters against real receivers ---------------------------------------
import gzip as _gzip  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent import futures  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import grpc  # noqa: E402

from otlp_receiver import OtlpReceiver, decode  # noqa: E402
from sipwatch.tracing import SpanPipeline  # noqa: E402


def expected_spans(records, resource, mask="partial"):
    """What a receiver must decode: the SDK's encoding of the reference builder's spans."""
    _, ref = reference(records, SpanBuilder(resource, mask))
    return decode(ref)


def key(s):
    return (s.trace_id, s.span_id)


def pipeline(stats, endpoint, protocol, env, tmp_path=None, **kw):
    p = SpanPipeline.configured("proxy", stats, endpoint, protocol,
                                str(tmp_path / "spans.jsonl") if tmp_path else None, "sw-unit", "partial",
                                None, env, **kw)
    assert isinstance(p, SpanPipeline)
    return p


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_pipeline_exports_every_field_to_the_real_receiver(tmp_path, protocol):
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        port = rx.grpc_port if protocol == "grpc" else rx.http_port
        p = pipeline(stats, f"127.0.0.1:{port}", protocol, {}, tmp_path, batch=7)
        for i in range(0, len(recs), 5):  # several ticks, several batches
            p.submit(recs[i:i + 5])
        p.shutdown(10)
        got = rx.snapshot()
    kind = "grpc" if protocol == "grpc" else "http"
    assert rx.requests[kind] >= 2 and rx.requests["grpc" if kind == "http" else "http"] == 0
    want = expected_spans(recs, p.resource)
    assert sorted(got, key=key) == sorted(want, key=key)
    assert stats.spans_exported == len(want) and stats.spans_dropped == 0
    # the file holds the same spans (its own encoding: OTLP/JSON)
    from sipwatch.waterfall import load_spans
    filed = load_spans(str(tmp_path / "spans.jsonl"))
    assert sorted((s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns) for s in filed) == \
        sorted((s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns) for s in want)


class _Capture:
    """An OTLP/HTTP endpoint (plain or TLS) that records each request's headers and decoded body."""

    def __init__(self, tls=None, status=200):
        self.requests = []
        cap = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector answers

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = _gzip.decompress(body)
                cap.requests.append((dict(self.headers), ExportTraceServiceRequest.FromString(body),
                                     self.client_address))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _cert(tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, crt


def test_http_headers_compression_keepalive(tmp_path):
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    cap = _Capture()
    try:
        env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s%20ecret,tenant=t1",
               "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"}
        stats = Stats(ring_size=16)
        p = pipeline(stats, f"http://127.0.0.1:{cap.port}", "http/protobuf", env, batch=4)
        for i in range(0, len(recs), 4):
            p.submit(recs[i:i + 4])
            deadline = time.monotonic() + 10
            while p._q and time.monotonic() < deadline:  # one batch per request
                time.sleep(0.01)
        p.shutdown(10)
    finally:
        cap.close()
    assert len(cap.requests) >= 3
    for headers, _, _ in cap.requests:
        assert headers["x-api-key"] == "s ecret" and headers["tenant"] == "t1"
        assert headers["Content-Type"] == "application/x-protobuf" and headers["Content-Encoding"] == "gzip"
    assert len({addr for _, _, addr in cap.requests}) == 1  # one keep-alive connection
    got = [s for _, req, _ in cap.requests for s in decode(req)]
    assert sorted(got, key=key) == sorted(expected_spans(recs, p.resource), key=key)
    assert stats.spans_exported == len(got)


def test_https_endpoint_uses_tls_with_the_configured_ca(tmp_path):
    import ssl
    key_file, crt = _cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key_file)
    cap = _Capture(tls=ctx)
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    try:
        # without the CA the server's certificate is refused: nothing arrives, all dropped
        s1 = Stats(ring_size=16)
        p = pipeline(s1, f"https://127.0.0.1:{cap.port}", "http/protobuf", {})
        p.submit(recs)
        p.shutdown(5)
        assert cap.requests == [] and s1.spans_dropped == len(recs) and s1.spans_exported == 0
        s2 = Stats(ring_size=16)
        p = pipeline(s2, f"https://127.0.0.1:{cap.port}", "http/protobuf",
                     {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(crt)})
        p.submit(recs)
        p.shutdown(5)
    finally:
        cap.close()
    assert s2.spans_exported == len(recs) and len(cap.requests) == 1


def test_grpc_headers_and_tls(tmp_path):
    key_file, crt = _cert(tmp_path)
    seen = []

    def export(request: bytes, context):
        seen.append((dict(context.invocation_metadata()), ExportTraceServiceRequest.FromString(request)))
        return b""

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    creds = grpc.ssl_server_credentials([(key_file.read_bytes(), crt.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    try:
        stats = Stats(ring_size=16)
        env = {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20t0k",
               "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(crt)}
        p = pipeline(stats, f"https://127.0.0.1:{port}", "grpc", env)
        p.submit(recs)
        p.shutdown(10)
    finally:
        server.stop(0)
    assert len(seen) == 1 and seen[0][0]["authorization"] == "Bearer t0k"
    assert sorted(decode(seen[0][1]), key=key) == sorted(expected_spans(recs, p.resource), key=key)
    assert stats.spans_exported == len(recs)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_backend_refusing_drops_and_backs_off(protocol):
    """HTTP 503 / connection refused: every span counted dropped, none exported, the thread lives."""
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    cap = _Capture(status=503)
    try:
        stats = Stats(ring_size=16)
        port = cap.port if protocol == "http/protobuf" else free_port()
        p = pipeline(stats, f"127.0.0.1:{port}", protocol, {}, batch=5)
        p.submit(recs)
        deadline = time.monotonic() + 20
        while stats.spans_dropped < len(recs) and time.monotonic() < deadline:
            time.sleep(0.02)
        p.submit(recs)  # during the back-off: dropped without being sent
        p.shutdown(2)
    finally:
        cap.close()
    assert stats.spans_exported == 0 and stats.spans_dropped == 2 * len(recs)
    if protocol == "http/protobuf":
        assert 1 <= len(cap.requests) < 2 * len(recs) / 5  # backed off: not one request per batch


def test_thread_pipeline_exports_what_the_records_said_when_submitted():
    """Right after ``submit`` the proxy's tick lets each call's transactions go and each completed
    transaction's response events (handoff.let_go_all, forget_events); the export thread encodes
    later. It must still export the provisional-response events and the call's transport (read
    from its first transaction: TCP here): before it read the records late, that call's span
    said UDP and every span lost its ``sip.response`` events."""
    from sipwatch.handoff import forget_events, let_go_all
    from sipwatch.state import RECORD
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    first = next(o for k, o in recs if k == "call" and o.is_call and o.transactions)
    first.transactions[0].peer = ("10.0.0.2", 5060, "tcp")
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", {})
        want = expected_spans(recs, p.resource)
        assert sum(1 for s in want if s.events) >= 6
        assert sum(1 for s in want if s.attributes.get("network.transport") == "tcp") == 2  # INVITE, call
        wake = p._wake.set
        p._wake.set = lambda: None  # the thread sleeps (0.5 s) while the tick goes on
        p.submit(recs)
        calls = [o for k, o in recs if k == "call" and o.is_call]
        for c in calls:
            c.holders = RECORD  # (the proxy's tracker sets it: Tracker.release)
        let_go_all(calls, None)
        forget_events(recs)
        assert all(not c.transactions for c in calls)
        assert all(o.events == () for k, o in recs if k == "tx" and o.t_final is not None)
        p._wake.set = wake
        p.shutdown(10)
        got = rx.snapshot()
    assert sorted(got, key=key) == sorted(want, key=key)
    assert stats.spans_exported == len(want) and stats.spans_dropped == 0


def test_queue_bound_and_bad_records_counted(tmp_path):
    recs = [r for r in proxy_records() if r[0] == "tx" or r[1].is_call]
    stats = Stats(ring_size=16)
    with OtlpReceiver() as rx:
        p = pipeline(stats, f"127.0.0.1:{rx.grpc_port}", "grpc", {}, queue_max=10)
        p._wake.set = lambda: None  # the thread sleeps (0.5 s) while the loop queues
        p.submit(recs)
        assert stats.spans_dropped == 0 and p._queue_dropped == len(recs) - 10

        class Broken:
            is_call = True
            sampled = True
            trace_id = 1
        p._queue_max = 1000
        p.submit([("call", Broken()), ("tx", Broken())])
        p.shutdown(10)
        got = rx.snapshot()
    assert len(got) == 10 and stats.spans_exported == 10
    assert stats.spans_dropped == len(recs) - 10 + 2 and p.failures == 2


# -- the proxy's worker process -------------------------------------------------------------------
def worker_pipeline(stats, endpoint, protocol, tmp_path, env=None, cid=None):
    p = SpanPipeline.configured("proxy", stats, endpoint, protocol, str(tmp_path / "spans.jsonl"), "sw-unit",
                                "partial", None, env or {}, call_id_mask=cid, worker=True)
    from sipwatch.span_worker import WorkerPipeline
    assert isinstance(p, WorkerPipeline) and p.proc.poll() is None
    return p


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_worker_process_exports_what_the_reference_encodes(tmp_path, protocol):
    """Records cross the pipe as tuples and come out as the same spans, masks included."""
    recs = proxy_records()
    stats = Stats(ring_size=16)
    cid = CallIdMasker("digits", b"k")
    with OtlpReceiver() as rx:
        port = rx.grpc_port if protocol == "grpc" else rx.http_port
        p = worker_pipeline(stats, f"127.0.0.1:{port}", protocol, tmp_path, cid=cid)
        for i in range(0, len(recs), 3):  # ticks: a call's records may straddle frames
            p.submit(recs[i:i + 3])
        p.shutdown(10)
        got = rx.snapshot()
    assert p.proc.returncode == 0
    spans = [r for r in recs if r[0] == "tx" or r[1].is_call]
    _, ref = reference(spans, SpanBuilder(p.resource, "partial", cid))
    assert sorted(got, key=key) == sorted(decode(ref), key=key)
    assert stats.spans_exported == len(spans) and stats.spans_dropped == 0 and p.failures == 0
    lines = (tmp_path / "spans.jsonl").read_bytes().splitlines()
    filed = [s for ln in lines for s in orjson.loads(ln)["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    assert len(filed) == len(spans)


def test_worker_reopen_file_failures_and_unsampled(tmp_path):
    """SIGHUP's re-open moves new spans to the new file; unsampled records never cross; a
    spans file that cannot be written is reported as the thread pipeline reports it."""
    recs = proxy_records()
    calls = [o for k, o in recs if k == "call" and o.is_call]
    calls[0].sampled = False  # its transactions keep their own flag: only the call span is skipped
    stats = Stats(ring_size=16)
    p = worker_pipeline(stats, None, None, tmp_path)
    p.submit(recs)
    deadline = time.monotonic() + 20
    n = sum(1 for k, o in recs if k == "tx" or o.is_call) - 1
    while stats.spans_exported < n and time.monotonic() < deadline:
        time.sleep(0.05)
        p.failures  # noqa: B018 - polls the worker's counters, as the proxy's tick does
    assert stats.spans_exported == n
    (tmp_path / "spans.jsonl").rename(tmp_path / "spans.jsonl.1")
    assert p.reopen()
    p.submit(recs[:2])
    p.shutdown(10)
    assert (tmp_path / "spans.jsonl").exists() and len((tmp_path / "spans.jsonl").read_bytes().splitlines()) == 1
    assert stats.spans_exported == n + 2 and stats.spans_dropped == 0
    # /dev/full: every write fails, counted and reported
    s2 = Stats(ring_size=16)
    p = SpanPipeline.configured("proxy", s2, None, None, "/dev/full", "sw", "partial", None, {}, worker=True)
    p.submit(recs)
    deadline = time.monotonic() + 20
    while not p.file_failing and time.monotonic() < deadline:
        time.sleep(0.05)
        p.failures  # noqa: B018
    assert p.file_failing and p.failures >= 1 and p.file_failures >= 1 and "OSError" in p.file_error
    p.shutdown(5)
    assert s2.spans_exported == 0 and s2.spans_dropped == n  # the unsampled call span never crossed


def test_worker_death_is_counted_not_fatal(tmp_path):
    recs = proxy_records()
    stats = Stats(ring_size=16)
    p = worker_pipeline(stats, None, None, tmp_path)
    p.proc.kill()
    p.proc.wait()
    for _ in range(3):
        p.submit(recs)  # EPIPE inside: counted, never raised
    assert p.failures == 1
    n = sum(1 for k, o in recs if k == "tx" or o.is_call)
    assert stats.spans_dropped >= 2 * n and stats.spans_exported == 0
    p.shutdown(1)


def test_worker_pipe_full_drops_are_counted(tmp_path):
    """A worker that does not read (stopped): the loop never blocks, frames beyond the bound are
    dropped and counted; the worker, let go again, exports the rest."""
    import signal
    recs = proxy_records()
    n = sum(1 for k, o in recs if k == "tx" or o.is_call)
    stats = Stats(ring_size=16)
    p = worker_pipeline(stats, None, None, tmp_path)
    p._pending_max = 64 * 1024
    os_kill = __import__("os").kill
    os_kill(p.proc.pid, signal.SIGSTOP)
    try:
        sent = 0
        t0 = time.monotonic()
        while p._dropped == 0 and sent < 5000:
            p.submit(recs)
            sent += 1
        assert p._dropped > 0 and time.monotonic() - t0 < 60
    finally:
        os_kill(p.proc.pid, signal.SIGCONT)
    p.shutdown(30)
    assert stats.spans_exported + stats.spans_dropped == sent * n
    assert stats.spans_exported > 0


def test_an_invented_method_is_cut_in_records_and_names_no_span():
    """A method is any token: one of 32 KB in each of a dialog's requests made a call's summary
    line megabytes long and its spans as large, and every invented method became a span name
    (a trace store indexes those). Through the core: the record keeps 32 bytes of the method,
    the span is named OTHER with the cut method in ``sip.request.method``, in both encoders."""
    from test_core import GATEWAY, SIGNALING, T0, invite, response_to
    from sipwatch.core import CoreConfig, ProxyCore
    from sipwatch.logs import call_summary_fields, dumps
    from sipwatch.state import MAX_METHOD_KEPT

    core = ProxyCore(CoreConfig(advertise=("10.0.0.2", 5060), upstream=SIGNALING, timer_b=32.0))
    inv = core.receive_datagram(invite(), GATEWAY, T0)[0][0]
    core.receive_datagram(response_to(inv, 200), SIGNALING, T0 + 0.1)
    in_dialog = {"to_tag": b"uas-1", "body": b""}
    core.receive_datagram(invite(method=b"ACK", branch=b"z9hG4bK-ack", **in_dialog), GATEWAY, T0 + 0.2)
    methods = [b"X" * 32_000 + b"Y" * i for i in range(10)]  # (letters only: a method has no digits here)
    for i, m in enumerate(methods):
        out = core.receive_datagram(invite(method=m, branch=b"z9hG4bK-m%d" % i, cseq=2 + i, **in_dialog),
                                    GATEWAY, T0 + 0.3 + i / 100)
        assert len(out) == 1 and out[0][0].startswith(m + b" sip:")  # forwarded whole
        core.receive_datagram(response_to(out[0][0], 200), SIGNALING, T0 + 0.305 + i / 100)
    bye = core.receive_datagram(invite(method=b"BYE", branch=b"z9hG4bK-bye", cseq=50, **in_dialog),
                                GATEWAY, T0 + 1)[0][0]
    core.receive_datagram(response_to(bye, 200), SIGNALING, T0 + 1.1)
    records = core.drain_finished()
    call = next(o for k, o in records if k == "call")
    line, err = dumps(call_summary_fields(call))
    assert err is None and len(line) < 8192, len(line)
    invented = [o for k, o in records if k == "tx" and o.method.startswith(b"XX")]
    assert len(invented) == 10 and {o.method for o in invented} == {b"X" * MAX_METHOD_KEPT}
    res = make_resource("sw-test", "proxy", {})
    got = check_same(records, res)  # (the SDK's builder and the direct encoder, with its C part)
    check_same(records, res, accelerate=False)
    spans = got.resource_spans[0].scope_spans[0].spans
    assert {s.name for s in spans} == {"SIP call", "INVITE", "ACK", "BYE", "OTHER"}
    other = [s for s in spans if s.name == "OTHER"]
    assert len(other) == 10 and len(got.SerializeToString()) < 20_000
    for s in other:
        attrs = {a.key: a.value.string_value for a in s.attributes}
        assert attrs["sip.request.method"] == "X" * MAX_METHOD_KEPT

"""A real OTLP trace receiver for tests: gRPC TraceService/Export and HTTP POST /v1/traces.

Both decode the protobuf ExportTraceServiceRequest the real exporters send and keep every span
as a plain :class:`Span`, so tests can compare ids and times with what SIPp and the sidecar saw.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # OTLP enum: 2 SERVER, 3 CLIENT
    start_ns: int
    end_ns: int
    attributes: dict
    events: list  # [(name, time_ns, attributes)]
    status_code: int  # 0 UNSET, 1 OK, 2 ERROR
    resource: dict = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        res = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                    s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes),
                    [(e.name, e.time_unix_nano, _attrs(e.attributes)) for e in s.events],
                    s.status.code, res))
    return out


class OtlpReceiver:
    """Listens on 127.0.0.1: ``grpc_port`` (gRPC) and ``http_port`` (HTTP/protobuf)."""

    def __init__(self):
        self.spans: list[Span] = []
        self.requests = {"grpc": 0, "http": 0}
        self._lock = threading.Lock()
        self._grpc = None
        self._http = None

    def _add(self, request, protocol: str) -> None:
        spans = decode(request)
        with self._lock:
            self.spans.extend(spans)
            self.requests[protocol] += 1

    def __enter__(self) -> "OtlpReceiver":
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver._add(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._add(req, "http")
                payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Span]:
        """Spans received so far, once at least ``count`` arrived (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.snapshot()

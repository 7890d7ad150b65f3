"""OTLP spans for finished calls and transactions, built and exported off the event loop.

Trace model (one trace per Call-ID, ids chosen by the core and already stamped into SIP):

* ``SIP call`` (SERVER): the call, INVITE received → final response to BYE, or the final
  failure / CANCEL / timeout. Span id ``call.span_id``; parent = the incoming traceparent's span.
* one CLIENT span per forwarded transaction (``INVITE``, ``ACK``, ``BYE``, ``CANCEL``, ...),
  forwarded → final response, span id = the id written into the forwarded ``traceparent``, so a
  next hop that joins the trace nests its spans under ours. Provisional responses are span
  events (``sip.response`` with ``sip.response.status_code``); 5xx/6xx/timeout set status ERROR.
* a request outside a dialog (REGISTER, OPTIONS, ...) is a trace of its own CLIENT span(s).

Passive capture (``sipwatch capture`` / ``sipwatch analyze``, resource ``sipwatch.role``
``capture`` / ``analyze``) builds the same spans from the observer's records, one CLIENT span per
transaction *per hop seen*, with ``client.address``/``client.port`` (the sender) next to
``server.*`` (the receiver). Its trace id is the one in the call's ``traceparent`` when a request
carries one (so the capture's spans join the sidecar's trace), else derived from the Call-ID.
Span times are packet timestamps. When the call's RTP was measured, the call span also carries:

* ``rtp.streams``: RTP streams (one SSRC, one direction) tied to the call by its SDP
* ``rtp.packets``: packets received in them; ``rtp.lost``: lost as Wireshark counts it
  (expected from the first to the last sequence number minus received, per stream never < 0)
* ``rtp.jitter_max_ms``: the largest RFC 3550 interarrival jitter of any stream (streams with a
  known clock rate)
* ``rtp.mos_min``: the lowest E-model MOS of any stream (codecs with G.113 figures)

Cost (issue 10: spans at 100 % for little more than ``--no-tracing``): no SDK Tracer (~35 µs a
span, locks) and, on the export path, no ``ReadableSpan`` and no SDK encoder either (together
~100 µs a span for protobuf and the JSON line). :class:`sipwatch.otlp_encode.SpanEncoder` writes
each span's OTLP protobuf and OTLP/JSON bytes straight from the finished record, with the
resource, scope and repeating attributes pre-encoded (a few µs a span for both). The bytes go
out as they are: OTLP/HTTP as one POST on a keep-alive ``http.client`` connection, OTLP/gRPC
through grpcio with no serializer on ``TraceService/Export``. :class:`SpanBuilder` (the SDK's
``ReadableSpan``) stays as the reference the encoder is tested against.

The proxy (:meth:`SpanPipeline.for_proxy`) encodes and exports in a worker *process*
(:mod:`sipwatch.span_worker`): its loop turns the sampled records into plain tuples, frames of
them (packed, or ``marshal``) written every 0.2 s to a non-blocking pipe, and nothing else; the
worker encodes the tuples themselves. An export thread in the proxy was measured first: at ~25 µs of thread CPU a
span it cost the loop's added round trip p99 ~1.9 → ~9.5 ms at 1000 calls/s (every datagram
callback waits to win the GIL back), and yielding the GIL every few spans cost ~11 µs a span in
switches. Capture and analyze (no forwarding to delay) keep the thread: :class:`SpanPipeline`
filters sampled records into a bounded deque, a daemon thread encodes them in batches, writes the
optional OTLP-JSON lines file and exports with short timeouts. The worker delivers through the
same ``_deliver`` step synchronously.

A full queue or pipe, or a failing backend, drops spans (counted in ``Stats.spans_dropped``);
while the backend is in back-off and there is no spans file, batches are dropped without being
encoded. Forwarding never waits for tracing.
"""
from __future__ import annotations

import gzip
import http.client
import os
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from urllib.parse import urlparse

import orjson
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import __version__
from .masking import mask_uri
from .otlp_encode import DELIVER_BYTES, LEG_SETUP_SPAN, SpanEncoder, hop_ends, leg_attributes, rtp_figures  # noqa: F401
from .otlp_options import DEFAULT_PORTS, add_otlp_arguments  # noqa: F401  (re-exported)
from .otlp_encode import call_transport as _call_transport
from .otlp_encode import record_tuple, span_name
from .pagecache import DropBehind
from .stats import DIRECTIONS, OUTCOMES, REJ5, REJ6, TIMEOUT
from .tracecontext import sampled_by_ratio

EXPORT_TIMEOUT = 2.0  # seconds per export request: a slow backend costs spans, not memory
MAX_BACKOFF = 5.0  # after a failed export, drop batches for up to this long before retrying
QUEUE_MAX = 50_000  # finished records waiting for the export thread
BATCH = 512
# The export thread runs Python (span building, OTLP encoding) while holding the GIL; a datagram
# arriving then waits until the interpreter switches threads, by default after 5 ms. 0.5 ms
# bounds that added forwarding delay at the price of more frequent (cheap) switches.
SWITCH_INTERVAL = 0.0005
# ... and the thread gives the GIL away on its own every 8 spans (a sleep, not a busy switch),
# so a datagram waits at most for that many spans' encoding (~0.1 ms), not a whole interval.
YIELD_EVERY = 10**9
YIELD_SLEEP = 0.00005
ERROR_OUTCOMES = frozenset((REJ5, REJ6, TIMEOUT))
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_SCOPE = InstrumentationScope("sipwatch", __version__)


# -- configuration -------------------------------------------------------------------------
def sampler_from_env(env) -> tuple[float, bool]:
    """(ratio, parent_based) from ``OTEL_TRACES_SAMPLER``/``_ARG``; unknown samplers → always on.

    A ``parentbased_*`` sampler keeps the caller's sampled flag for joined traces (the core does
    that already); plain ``traceidratio``/``always_*`` decide from the trace id alone.
    """
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    parent_based = name.startswith("parentbased_")
    base = name.removeprefix("parentbased_")
    if base == "always_off":
        return 0.0, parent_based
    if base == "traceidratio":
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0
        return (min(max(ratio, 0.0), 1.0) if ratio == ratio else 1.0), parent_based
    return 1.0, parent_based


def resolve_protocol(settings_protocol: str | None, env) -> str:
    proto = (settings_protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
             or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if proto not in DEFAULT_PORTS:
        sys.stderr.write(f"sipwatch: OTLP protocol {proto!r} is not supported, using grpc\n")
        proto = "grpc"
    return proto


def resolve_endpoint(settings_endpoint: str | None, protocol: str, env) -> str | None:
    """The URL to hand the exporter, or None when no endpoint is configured.

    ``--otlp-endpoint`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are base addresses (``/v1/traces``
    is appended for HTTP); ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as given. A bare
    ``host:port`` means plain-text ``http://`` (a collector next to the sidecar).
    """
    exact = False
    ep = settings_endpoint
    if not ep:
        ep = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        exact = bool(ep)
    if not ep:
        ep = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not ep:
        return None
    ep = ep.strip()
    if "://" not in ep:
        ep = "http://" + ep
    u = urlparse(ep)
    netloc = u.netloc if u.port else f"{u.netloc}:{DEFAULT_PORTS[protocol]}"
    path = u.path
    if protocol == "http/protobuf" and not exact:
        path = path.rstrip("/") + "/v1/traces"
    return f"{u.scheme}://{netloc}{path}"


def make_resource(service_name: str, role: str, env) -> Resource:
    """service.name (flag > OTEL_SERVICE_NAME > OTEL_RESOURCE_ATTRIBUTES > sipwatch), instance, host, role."""
    from_env = OTELResourceDetector().detect().attributes
    attrs = {"service.instance.id": str(uuid.uuid4()), "host.name": socket.gethostname(),
             "sipwatch.role": role}
    attrs.update(from_env)
    if service_name != "sipwatch" or "service.name" not in from_env:
        attrs["service.name"] = service_name
    r = Resource.create(attrs)
    return _HashOnce(r.attributes, r.schema_url)


class _HashOnce(Resource):
    """The OTLP encoder groups spans by resource and hashes it per span (a json.dumps, ~20 µs);
    our resource never changes, so hash it once."""

    def __init__(self, attributes, schema_url=None):
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _env(env, name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>`` (as the SDK reads them)."""
    v = env.get("OTEL_EXPORTER_OTLP_TRACES_" + name) or env.get("OTEL_EXPORTER_OTLP_" + name)
    return v.strip() if v and v.strip() else None


def _read(path: str | None) -> bytes | None:
    """A PEM file named by OTEL_*; unreadable: said once on stderr, then None (system defaults),
    as the SDK's exporters do, instead of stopping the proxy."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        sys.stderr.write(f"sipwatch: OTLP TLS file {path!r} unreadable ({exc}); using the defaults\n")
        return None


class HttpExporter:
    """OTLP/HTTP protobuf: the encoded request POSTed on one keep-alive connection."""

    def __init__(self, endpoint: str, headers=None, timeout: float = EXPORT_TIMEOUT,
                 compression: str | None = None, certificate: str | None = None,
                 client_certificate: str | None = None, client_key: str | None = None):
        u = urlparse(endpoint)
        self.https = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.https else 80)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.timeout = timeout
        self.compression = compression if compression in ("gzip", "deflate") else None
        self.headers = {"Content-Type": "application/x-protobuf", "User-Agent": f"sipwatch/{__version__}"}
        if self.compression:
            self.headers["Content-Encoding"] = self.compression
        self.headers.update(headers or {})
        self._tls = None
        if self.https:
            ca = _read(certificate)
            try:
                self._tls = ssl.create_default_context(cadata=ca.decode("ascii", "replace") if ca else None)
            except (ssl.SSLError, ValueError) as exc:
                sys.stderr.write(f"sipwatch: OTLP CA certificate unusable ({exc}); using the system's\n")
                self._tls = ssl.create_default_context()
            if client_certificate:
                try:
                    self._tls.load_cert_chain(client_certificate, client_key)
                except (OSError, ssl.SSLError) as exc:
                    sys.stderr.write(f"sipwatch: OTLP client certificate unusable ({exc}); sending none\n")
        self._conn = None

    def _connect(self):
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def export(self, data: bytes) -> bool:
        if self.compression == "gzip":
            data = gzip.compress(data, 1)
        elif self.compression == "deflate":
            data = zlib.compress(data, 1)
        for _ in range(2):
            reused = self._conn is not None
            conn = self._conn or self._connect()
            self._conn = conn
            try:
                conn.request("POST", self.path, data, self.headers)
                resp = conn.getresponse()
                resp.read()
                if resp.will_close:
                    self._close()
                return 200 <= resp.status < 300
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._close()
                if not reused:  # a fresh connection failed: the backend, not a stale keep-alive
                    return False
            except (OSError, http.client.HTTPException, ValueError):
                self._close()
                return False
        return False

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def shutdown(self) -> None:
        self._close()


EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class GrpcExporter:
    """OTLP/gRPC: the encoded request sent as is (identity serializer) to TraceService/Export."""

    def __init__(self, endpoint: str, headers=None, timeout: float = EXPORT_TIMEOUT,
                 compression: str | None = None, certificate: str | None = None,
                 client_certificate: str | None = None, client_key: str | None = None):
        import grpc
        self._grpc = grpc
        u = urlparse(endpoint)
        target = u.netloc
        comp = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}.get(compression or "")
        if u.scheme == "https":
            creds = grpc.ssl_channel_credentials(_read(certificate), _read(client_key), _read(client_certificate))
            self._channel = grpc.secure_channel(target, creds, compression=comp)
        else:
            self._channel = grpc.insecure_channel(target, compression=comp)
        # no serializer: the bytes go out as they are, the response bytes are not parsed
        self._export = self._channel.unary_unary(EXPORT_METHOD)
        self.timeout = timeout
        self.metadata = tuple((k.lower(), v) for k, v in (headers or {}).items()) or None

    def export(self, data: bytes) -> bool:
        try:
            self._export(data, timeout=self.timeout, metadata=self.metadata)
        except self._grpc.RpcError:
            return False
        return True

    def shutdown(self) -> None:
        self._channel.close()


def make_exporter(endpoint: str, protocol: str, env=None):
    """An OTLP exporter of encoded requests; OTEL_EXPORTER_OTLP_[TRACES_]HEADERS, _CERTIFICATE,
    _CLIENT_CERTIFICATE, _CLIENT_KEY and _COMPRESSION as the SDK's exporters read them."""
    env = os.environ if env is None else env
    from opentelemetry.util.re import parse_env_headers
    raw = _env(env, "HEADERS")
    kw = dict(headers=parse_env_headers(raw, liberal=True) if raw else None, timeout=EXPORT_TIMEOUT,
              compression=(_env(env, "COMPRESSION") or "").lower() or None,
              certificate=_env(env, "CERTIFICATE"), client_certificate=_env(env, "CLIENT_CERTIFICATE"),
              client_key=_env(env, "CLIENT_KEY"))
    if protocol == "http/protobuf":
        return HttpExporter(endpoint, **kw)
    return GrpcExporter(endpoint, **kw)


# -- spans from records --------------------------------------------------------------------
class SpanBuilder:
    """Turns finished ``Transaction``/``Call`` records into ``ReadableSpan`` objects."""

    def __init__(self, resource: Resource, mask_mode: str = "partial", call_id_mask=None):
        self.resource = resource
        self.mask_mode = mask_mode
        self.call_id_mask = call_id_mask  # bytes Call-ID -> str (masking.CallIdMasker); None: as is
        self._parties: dict[int, tuple[str, str, str]] = {}  # id(call) → masked from/to/call-id

    def _party(self, call) -> tuple[str, str, str]:
        key = id(call)
        got = self._parties.get(key)
        if got is None or got[3] is not call:
            if len(self._parties) > 4096:
                self._parties.clear()
            cid = self.call_id_mask
            got = (mask_uri(call.from_uri, self.mask_mode), mask_uri(call.to_uri, self.mask_mode),
                   cid(call.call_id) if cid is not None else call.call_id.decode("utf-8", "replace"),
                   call)
            self._parties[key] = got
        return got[:3]

    def build(self, kind: str, obj) -> ReadableSpan:
        return self.call_span(obj) if kind == "call" else self.tx_span(obj)

    def tx_span(self, tx) -> ReadableSpan:
        call = tx.call
        frm, to, call_id = self._party(call)
        client, (host, port), transport = hop_ends(tx)
        attrs = {
            "sip.request.method": tx.method.decode("ascii", "replace"),
            "sip.call_id": call_id,
            "sip.cseq": tx.cseq,
            "sip.direction": DIRECTIONS[tx.direction],
            "network.transport": transport,
            "server.address": host,
            "server.port": port,
            "network.peer.address": host,
        }
        if client is not None:
            attrs["client.address"], attrs["client.port"] = client
        if not call.is_call:  # no call span above to carry the parties
            attrs["sip.from"] = frm
            attrs["sip.to"] = to
        if tx.status:
            attrs["sip.response.status_code"] = tx.status
        if tx.t_first is not None:
            attrs["sip.rtt_ms"] = round((tx.t_first - tx.t_sent) * 1000.0, 3)
        if tx.retrans:
            attrs["sip.retransmissions"] = tx.retrans
        status = _OK
        if tx.timed_out:
            attrs["error.type"] = "timeout"
            status = Status(StatusCode.ERROR, "no final response (timeout)")
        elif tx.status >= 500:
            attrs["error.type"] = str(tx.status)
            status = Status(StatusCode.ERROR, f"SIP {tx.status}")
        events = [Event("sip.response", {"sip.response.status_code": s}, int(t * 1e9))
                  for s, t in tx.events if s < 200]
        parent = tx.parent_span_id
        return ReadableSpan(
            name=span_name(tx.method),
            context=SpanContext(tx.trace_id, tx.span_id, False, _SAMPLED),
            parent=None if not parent else SpanContext(
                tx.trace_id, parent, parent != call.span_id or not call.is_call, _SAMPLED),
            resource=self.resource, attributes=attrs, events=events, kind=SpanKind.CLIENT,
            status=status, start_time=int(tx.t_sent * 1e9), end_time=int(tx.t_final * 1e9),
            instrumentation_scope=_SCOPE,
        )

    def call_span(self, call) -> ReadableSpan:
        frm, to, call_id = self._party(call)
        attrs = {
            "sip.request.method": "INVITE",
            "sip.call_id": call_id,
            "sip.from": frm,
            "sip.to": to,
            "sip.request.uri": mask_uri(call.ruri, self.mask_mode),
            "sip.call.outcome": OUTCOMES[call.outcome] if call.outcome >= 0 else "unknown",
            "network.transport": _call_transport(call),
            "network.protocol.name": "sip",
        }
        if call.status:
            attrs["sip.response.status_code"] = call.status
        if call.t_setup is not None:
            attrs["sip.call.setup_ms"] = round((call.t_setup - call.t_start) * 1000.0, 3)
        if call.t_answer is not None:
            attrs["sip.call.answer_ms"] = round((call.t_answer - call.t_start) * 1000.0, 3)
            attrs["sip.call.duration_s"] = round(call.t_end - call.t_answer, 6)
        if call.retrans:
            attrs["sip.retransmissions"] = call.retrans
        group = getattr(call, "group", None)
        if group is not None:
            attrs.update(leg_attributes(call, group, self.call_id_mask))
        if call.rtp:
            attrs.update(call.rtp)
        status = _OK
        if call.outcome in ERROR_OUTCOMES:
            status = Status(StatusCode.ERROR, attrs["sip.call.outcome"])
            attrs["error.type"] = "timeout" if call.outcome == TIMEOUT else str(call.status)
        parent = call.parent_span_id
        return ReadableSpan(
            name="SIP call",
            context=SpanContext(call.trace_id, call.span_id, False, _SAMPLED),
            parent=None if not parent else SpanContext(call.trace_id, parent,
                                                       parent != getattr(call, "gap_parent", 0), _SAMPLED),
            resource=self.resource, attributes=attrs, kind=SpanKind.SERVER, status=status,
            start_time=int(call.t_start * 1e9), end_time=int(call.t_end * 1e9),
            instrumentation_scope=_SCOPE,
        )


    def leg_setup_span(self, call) -> ReadableSpan | None:
        """The B2BUA leg-setup INTERNAL span of a joined leg (see SpanEncoder.leg_setup)."""
        if not getattr(call, "gap_span_id", 0):
            return None
        attrs = {"sip.call_id": self._party(call)[2]}
        attrs.update(leg_attributes(call, call.group, self.call_id_mask))
        return ReadableSpan(
            name=LEG_SETUP_SPAN, context=SpanContext(call.trace_id, call.gap_span_id, False, _SAMPLED),
            parent=SpanContext(call.trace_id, call.gap_parent, False, _SAMPLED),
            resource=self.resource, attributes=attrs, kind=SpanKind.INTERNAL, status=_OK,
            start_time=int(call.gap_start * 1e9), end_time=int(call.t_start * 1e9),
            instrumentation_scope=_SCOPE)


def _any_value(v) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


def _key_values(attrs) -> list:
    return [{"key": k, "value": _any_value(v)} for k, v in attrs.items()]


def _span_json(s: ReadableSpan) -> dict:
    ctx, parent = s.context, s.parent
    d = {"traceId": "%032x" % ctx.trace_id, "spanId": "%016x" % ctx.span_id,
         "flags": 0x100 | (0x200 if parent is not None and parent.is_remote else 0),
         "name": s.name, "kind": s.kind.value + 1,  # OTLP enum counts from UNSPECIFIED = 0
         "startTimeUnixNano": str(s.start_time), "endTimeUnixNano": str(s.end_time),
         "attributes": _key_values(s.attributes),
         "status": {} if s.status.status_code is StatusCode.UNSET else
         {"code": s.status.status_code.value, "message": s.status.description or ""}}
    if parent is not None:
        d["parentSpanId"] = "%016x" % parent.span_id
    if s.events:
        d["events"] = [{"timeUnixNano": str(e.timestamp), "name": e.name,
                        "attributes": _key_values(e.attributes)} for e in s.events]
    return d


def otlp_json_line(spans, resource: Resource) -> bytes:
    """One ExportTraceServiceRequest as an OTLP/JSON line (hex ids, integer enums, int64 as
    strings), written straight from the spans: json_format on the protobuf costs ~2x more."""
    doc = {"resourceSpans": [{
        "resource": {"attributes": _key_values(resource.attributes)},
        "scopeSpans": [{"scope": {"name": _SCOPE.name, "version": _SCOPE.version},
                        "spans": [_span_json(s) for s in spans]}],
    }]}
    return orjson.dumps(doc) + b"\n"


# -- the pipeline --------------------------------------------------------------------------
class SpanPipeline:
    """Bounded hand-off from the event loop to one export thread."""

    def __init__(self, stats, encoder: SpanEncoder, exporter=None, spans_file: str | None = None,
                 sample_ratio: float = 1.0, parent_based: bool = True,
                 queue_max: int = QUEUE_MAX, batch: int = BATCH, threaded: bool = True):
        self.stats = stats
        self.encoder = encoder
        self.resource = None  # the Resource the encoder carries (set by ``configured``)
        self.exporter = exporter  # HttpExporter / GrpcExporter: export(bytes) -> bool
        self.sample_ratio = sample_ratio
        self.parent_based = parent_based
        self._own_decision = not parent_based  # decide from the trace id, ignore the caller's flag
        # unbuffered: a failed write (full disk) fails now, and leaves no backlog in a buffer
        self.spans_file = spans_file
        self._file = open(spans_file, "ab", buffering=0) if spans_file else None
        self._drop = DropBehind(self._file.fileno()) if self._file is not None else None
        self._reopen = False
        self._torn = False  # the last line was cut short by a failed write
        # written by the export thread only; the proxy's tick reads them (logs, internal errors)
        self.failures = 0  # span building or file writes that failed
        self.file_failures = 0
        self.file_failing = False
        self.file_error: str | None = None
        self._q: deque = deque()
        self._queue_max = queue_max
        self._batch = batch
        self._queue_dropped = 0  # written by the event loop only
        self._export_dropped = 0  # written by the export thread only
        self._wake = threading.Event()
        self._stopping = False
        self._deadline = float("inf")
        self._backoff = 0.0
        self._retry_at = 0.0
        self._thread = None
        if not threaded:  # the span worker process drives _export itself
            return
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="sipwatch-spans", daemon=True)
        self._thread.start()

    @classmethod
    def for_proxy(cls, settings, stats, env=None, call_id_mask=None, log=None):
        """The proxy's pipeline, or a no-export stand-in (sampler only) with no endpoint/file.
        ``call_id_mask`` turns a Call-ID into what ``sip.call_id`` shows (as the logs do);
        ``log`` (a :class:`~sipwatch.logs.JsonLog` on a real file or pipe): the worker process
        writes its call summaries."""
        return cls.configured("proxy", stats, settings.otlp_endpoint, settings.otlp_protocol,
                              settings.spans_file, settings.service_name, settings.mask_numbers,
                              settings.sample_ratio, env, call_id_mask=call_id_mask, worker=True, log=log)

    @classmethod
    def for_capture(cls, role, stats, endpoint=None, protocol=None, spans_file=None,
                    mask_mode="partial", env=None, **kw):
        """``sipwatch capture``/``analyze`` (``role``): flags and OTEL_* as for the proxy; None
        when there is nowhere to send spans. ``kw`` goes to the constructor (queue size)."""
        env = os.environ if env is None else env
        service = env.get("OTEL_SERVICE_NAME") or "sipwatch"
        p = cls.configured(role, stats, endpoint, protocol, spans_file, service, mask_mode,
                           None, env, **kw)
        return None if isinstance(p, NoExport) else p

    @classmethod
    def configured(cls, role, stats, endpoint, protocol, spans_file, service_name, mask_mode,
                   sample_ratio=None, env=None, call_id_mask=None, worker=False, log=None, **kw):
        """``worker``: encode and export in a child process (:mod:`sipwatch.span_worker`), the
        proxy's choice; else in a thread of this process (capture, analyze, tests)."""
        env = os.environ if env is None else env
        ratio, parent_based = sampler_from_env(env)
        if sample_ratio is not None:
            ratio, parent_based = sample_ratio, True
        protocol = resolve_protocol(protocol, env)
        endpoint = resolve_endpoint(endpoint, protocol, env)
        if endpoint is None and not spans_file:
            return NoExport(ratio, parent_based)
        resource = make_resource(service_name, role, env)
        if worker:
            p = _worker_pipeline(stats, resource, mask_mode, call_id_mask, endpoint, protocol, spans_file, env,
                                 ratio, parent_based, log)
            if p is not None:
                return p
        encoder = SpanEncoder(resource.attributes, __version__, mask_mode, call_id_mask, resource.schema_url)
        exporter = make_exporter(endpoint, protocol, env) if endpoint else None
        pipeline = cls(stats, encoder, exporter, spans_file, ratio, parent_based, **kw)
        pipeline.resource = resource
        return pipeline

    # event loop side ------------------------------------------------------------------
    def submit(self, records) -> None:
        """Queue the sampled records as their tuples (:func:`~sipwatch.otlp_encode.tx_tuple`,
        ``call_tuple``), read now: the proxy lets a call's transactions go, and a completed
        transaction's events, right after this. Never blocks; drops (and counts) when the queue
        is full. A record that cannot be read is queued as None, counted by the thread."""
        q = self._q
        room = self._queue_max - len(q)
        dropped = 0
        own, ratio = self._own_decision, self.sample_ratio
        for rec in records:
            obj = rec[1]
            is_call = rec[0] == "call"
            if is_call and not obj.is_call:
                continue  # a non-dialog request's trace is its transaction span(s)
            if not (sampled_by_ratio(obj.trace_id, ratio) if own else obj.sampled):
                continue
            if room > 0:
                try:
                    q.append(record_tuple(obj, is_call))
                except Exception:  # noqa: BLE001 - the thread counts it (its counters are its own)
                    q.append(None)
                room -= 1
            else:
                dropped += 1
        if dropped:
            self._queue_dropped += dropped
        if q:
            self._wake.set()

    def reopen(self) -> bool:
        """Re-open the spans file (SIGHUP, after log rotation) before the next write."""
        if self.spans_file is None:
            return False
        self._reopen = True
        self._wake.set()
        return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued within ``timeout`` seconds, drop the rest, close the sinks."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + EXPORT_TIMEOUT)
        if self.exporter is not None:
            self.exporter.shutdown()
        self._publish()

    def close(self) -> None:
        """Close the sinks (the worker process, which calls ``_export`` itself, at its end)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self.exporter is not None:
            self.exporter.shutdown()
        self._publish()

    # export thread side ---------------------------------------------------------------
    def _run(self) -> None:
        q = self._q
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while q:
                n = min(len(q), self._batch)
                batch = [q.popleft() for _ in range(n)]
                if self._stopping and time.monotonic() > self._deadline:
                    self._export_dropped += n + len(q)
                    q.clear()
                    break
                self._export(batch)
                self._publish()
            self._publish()
            if self._stopping:
                if self._file is not None:
                    try:
                        self._file.close()
                    except OSError:
                        pass
                return

    def _export(self, batch) -> None:
        """Encode queued record tuples (None: a record that could not be read) and deliver them
        (the export thread's step); a malformed one is counted, never fatal."""
        if not self._backend_or_file():
            self._export_dropped += len(batch)  # backend failed recently: shed, do not even encode
            return
        tuples = [t for t in batch if t is not None]
        pbs: list = []
        lines: list = []
        failed = len(batch) - len(tuples) + self.encoder.encode(tuples, pbs, lines)
        if failed:
            self._export_dropped += failed
            self.failures += failed
        self._deliver(pbs, lines)

    def _backend_or_file(self) -> bool:
        """False while the backend is in back-off and there is no spans file: nothing to encode for."""
        return self.spans_file is not None or (self.exporter is not None and time.monotonic() >= self._retry_at)

    def _deliver(self, pbs: list, lines: list) -> None:
        """Encoded spans (``ScopeSpans.spans`` fields, OTLP/JSON objects) to the spans file as one
        line and to the backend as one request; counted as exported or dropped."""
        enc = self.encoder
        start, size = 0, 0
        for i, pb in enumerate(pbs):  # requests of at most ~DELIVER_BYTES (see there)
            if size >= DELIVER_BYTES:
                self._deliver_some(enc, pbs[start:i], lines[start:i])
                start, size = i, 0
            size += len(pb)
        if start < len(pbs):
            self._deliver_some(enc, pbs[start:], lines[start:])

    def _deliver_some(self, enc, pbs: list, lines: list) -> None:
        self.deliver_batch(len(pbs), lambda want_request, want_line: (
            enc.request(pbs) if want_request else None, enc.json_line(lines) if want_line else None))

    def deliver_batch(self, n: int, make) -> None:
        """``n`` spans to the spans file as one line and to the backend as one request, as
        :meth:`_deliver`; ``make(want_request, want_line)`` gives (request, line), each built only
        when wanted (the backend may be in back-off, the file not configured)."""
        if not n:
            return
        exporter = self.exporter
        ok = True
        if self._reopen or (self._file is None and self.spans_file is not None):
            self._reopen_file()
        want_request = exporter is not None and time.monotonic() >= self._retry_at
        request, line = make(want_request, self.spans_file is not None)
        if self.spans_file is not None:
            ok = self._write_file(line)
        if exporter is not None:
            if not want_request:
                ok = False  # backend failed recently: shed load instead of queueing behind it
            else:
                try:
                    ok = exporter.export(request)
                except Exception:  # noqa: BLE001
                    ok = False
                if ok:
                    self._backoff = 0.0
                else:
                    self._backoff = min(MAX_BACKOFF, max(0.5, self._backoff * 2))
                    self._retry_at = time.monotonic() + self._backoff
        if ok:
            self.stats.spans_exported += n
        else:
            self._export_dropped += n

    def _reopen_file(self) -> None:
        self._reopen = False
        try:
            f = open(self.spans_file, "ab", buffering=0)
        except OSError as exc:
            self._file_failed(exc)
            return
        old, self._file, self._torn = self._file, f, False
        self._drop = DropBehind(f.fileno())
        if old is not None:
            try:
                old.close()
            except OSError:
                pass

    def _write_file(self, line: bytes) -> bool:
        """One OTLP-JSON line; a failure (ENOSPC, EIO, closed file) is counted, never raised."""
        if self._file is None:
            return False
        if self._torn:
            line = b"\n" + line  # end the line a failed write cut short
        view = memoryview(line)
        try:
            for _ in range(64):  # partial writes on a regular file are rare; bounded anyway
                n = self._file.write(view)
                if n is None or n <= 0:
                    raise OSError("spans file accepts no data")
                view = view[n:]
                if not view:
                    break
            else:
                raise OSError("spans file write made no progress")
        except (OSError, ValueError) as exc:
            self._torn = len(view) != len(line)
            self._file_failed(exc)
            return False
        self._torn = False
        self.file_failing = False
        self._drop.wrote(len(line))
        return True

    def _file_failed(self, exc: Exception) -> None:
        self.failures += 1
        self.file_failures += 1
        self.file_error = f"{type(exc).__name__}: {exc}"[:300]
        self.file_failing = True

    def _publish(self) -> None:
        self.stats.spans_dropped = self._export_dropped + self._queue_dropped


def _worker_pipeline(stats, resource, mask_mode, call_id_mask, endpoint, protocol, spans_file, env, ratio,
                     parent_based, log=None):
    """The proxy's span worker process, or None (then the thread pipeline) when it cannot start."""
    import pickle

    from .span_worker import WorkerPipeline
    config = {"resource": dict(resource.attributes), "schema_url": resource.schema_url or "",
              "version": __version__, "mask_mode": mask_mode, "call_id_mask": call_id_mask,
              "endpoint": endpoint, "protocol": protocol, "spans_file": spans_file,
              "env": {k: v for k, v in env.items() if k.startswith("OTEL_EXPORTER_OTLP_")}}
    log_fd = _summary_fd(log)
    if log_fd is not None:
        from .logs import LEVELS
        config["log"] = {"service_name": log.service_name, "mask_mode": log.mask_mode,
                         "level": LEVELS[log.min_level], "call_id_mask": log.call_id_mask}
    try:
        pickle.dumps(config)
        p = WorkerPipeline(stats, config, ratio, parent_based, log_fd=log_fd)
    except Exception as exc:  # noqa: BLE001 - e.g. no fork allowed, an unpicklable masker
        sys.stderr.write(f"sipwatch: span worker process not started ({exc}); exporting from a thread\n")
        return None
    p.resource = resource
    if log is not None:  # its notices as log lines: never a blocking write to stderr on the loop
        p.notice = lambda text: log.warning(text, "span_worker")
    return p


def _summary_fd(log) -> int | None:
    """The descriptor of ``log``'s stream when the span worker can write the call summaries
    there too: a real file, pipe or socket, and summaries logged at all (level info or lower)."""
    if log is None or getattr(log, "min_level", 99) > 1:
        return None
    try:
        fd = log.stream.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    return fd


class NoExport:
    """Tracing on but nowhere to send spans: only the sampler setting matters (it sets the flag)."""

    def __init__(self, sample_ratio: float, parent_based: bool = True):
        self.sample_ratio = sample_ratio
        self.parent_based = parent_based

    def submit(self, records) -> None:
        pass

    def shutdown(self, timeout: float = 0.0) -> None:
        pass


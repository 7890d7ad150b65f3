"""Prometheus exposition for the two reserved ports, served on the proxy's own event loop.

* gateway side (default :13012): call counts and outcomes, requests/responses, retransmissions,
  parse errors, evictions, active calls, call setup and duration histograms.
* signaling side (default :13022): ``signaler_rtt_milliseconds`` by method (with OpenMetrics
  exemplars carrying trace ids), transaction timeouts, upstream send errors, span export.

The hot path only bumps plain ints in :class:`~sipwatch.stats.Stats`; the collectors below turn
them into metric families at scrape time. The RTT ring is folded here too. Because the HTTP
server runs on the same asyncio loop as the proxy, the fold never races the hot path and no lock
is needed.
"""
from __future__ import annotations

import asyncio
import socket
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Exemplar

from .correlation import KINDS as CORRELATION_KINDS
from .handoff import call_figures
from .stats import (
    COMPONENTS, CORRELATION_RESULTS, DIRECTIONS, DROP_REASONS, METHODS, OUTCOMES, RTT_BUCKETS_MS, Stats,
)

_METHOD_NAMES = [m.decode() for m in METHODS]
CALL_SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60)
CALL_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
# a B2BUA placing its outbound leg: tens of milliseconds when healthy, seconds when it waits on a
# database or a routing service
LEG_SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_CONNECTIONS = 64  # per metrics endpoint; more are refused (oldest idle one closed first)
# Expositions built per second per endpoint past a burst; other scrapes get the last one built.
# Building one holds the loop 0.7-1.7 ms on the gateway side and 3-8 ms on the signaling side
# with a full set of exemplars (15 methods; every series of the registry): one client scraping
# in a loop once took an OPTIONS round trip through the proxy from a p50 of 150 µs to 870 µs,
# and a client taking the ten fresh builds a second of the signaling side took its p99 from 0.56
# to 6.5 ms. A Prometheus pair scraping every few seconds never meets the bound, and what a
# scrape past it gets is at most 1/FRESH_PER_SECOND s old. (At 1 a second, a scrape right after
# an event read the counters of up to a second before: the suite's own checks did.)
FRESH_PER_SECOND = 10.0
FRESH_BURST = 20
# Connections accepted per second per endpoint past a burst; past it the endpoint stops accepting
# for ACCEPT_PAUSE s and the rest wait in the kernel's queue (ACCEPT_BACKLOG). Each connection
# takes the loop ~95 µs: four clients connecting in a loop (8,700 a second) took the proxy, which
# forwards on the same loop, to 82% of a CPU (under a pod's CPU limit, the calls' own CPU).
ACCEPT_PER_SECOND = 500.0
ACCEPT_BURST = 200
ACCEPT_PAUSE = 0.05
ACCEPT_BATCH = 16  # connections accepted per wake-up of the listener before the loop goes on
ACCEPT_BACKLOG = 1024
IDLE_TIMEOUT = 2.0  # seconds a connection may take to send its request
MAX_HEAD = 16 << 10  # bytes of a request head (a scraper's or a probe's is a few hundred)
WRITE_TIMEOUT = 5.0  # seconds a scraper may take to read the response


def _fmt_le(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(float(b))


class _Guarded:
    """A collector whose failure is counted (component ``metrics``), not a failed scrape."""

    on_error = None

    def collect(self):
        try:
            yield from self._collect()
        except Exception as exc:  # noqa: BLE001
            if self.on_error is not None:
                self.on_error("metrics", exc)


class InternalErrorsCollector(_Guarded):
    """``sipwatch_internal_errors_total{component}``: failures caught and survived, fixed labels."""

    def __init__(self, stats: Stats, on_error=None):
        self.stats = stats
        self.on_error = on_error

    def _collect(self):
        fam = CounterMetricFamily("sipwatch_internal_errors", "Internal failures caught and survived (the process carried on), by component.", labels=["component"])
        errs = self.stats.internal_errors
        for c in COMPONENTS:
            fam.add_metric([c], errs.get(c, 0))
        yield fam


class GatewayCollector(_Guarded):
    """Counters of the gateway-facing view: what passed through and how calls ended."""

    def __init__(self, stats: Stats, on_error=None):
        self.stats = stats
        self.on_error = on_error

    def _collect(self):
        s = self.stats
        calls = CounterMetricFamily("sip_calls_processed", "INVITE dialogs counted once at their final response or timeout, by outcome.", labels=["outcome"])
        for i, name in enumerate(OUTCOMES):
            calls.add_metric([name], s.calls[i])
        yield calls
        req = CounterMetricFamily("sip_requests", "SIP requests received, retransmissions included.", labels=["method", "direction", "transport"])
        tcp = getattr(s, "requests_tcp", None) or [0] * len(s.requests)
        for mi, m in enumerate(_METHOD_NAMES):
            for di, d in enumerate(DIRECTIONS):
                i = mi * 2 + di
                v = s.requests[i]
                if v - tcp[i]:
                    req.add_metric([m, d, "udp"], v - tcp[i])
                if tcp[i]:
                    req.add_metric([m, d, "tcp"], tcp[i])
        yield req
        resp = CounterMetricFamily("sip_responses", "SIP responses received, by status class.", labels=["status_class", "direction"])
        for ci in range(6):
            for di, d in enumerate(DIRECTIONS):
                resp.add_metric([f"{ci + 1}xx", d], s.responses[ci * 2 + di])
        yield resp
        rt = CounterMetricFamily("sip_retransmissions", "Retransmitted requests/responses forwarded (not timed twice).", labels=["kind"])
        rt.add_metric(["request"], s.request_retransmissions)
        rt.add_metric(["response"], s.response_retransmissions)
        yield rt
        yield CounterMetricFamily("sip_parse_errors", "Datagrams that were not valid SIP; counted and dropped.", value=s.parse_errors)
        yield CounterMetricFamily("sip_keepalives", "CRLF keep-alive datagrams (RFC 5626) ignored.", value=s.keepalives)
        ev = CounterMetricFamily("sip_state_evictions", "In-flight state dropped because its table was full.", labels=["table"])
        ev.add_metric(["transactions"], s.evicted_transactions)
        ev.add_metric(["calls"], s.evicted_calls)
        yield ev
        yield CounterMetricFamily("sip_loops_detected", "Requests answered 482 Loop Detected.", value=s.loops)
        yield CounterMetricFamily("sip_too_many_hops", "Requests answered 483 Too Many Hops.", value=s.too_many_hops)
        yield CounterMetricFamily("sip_traceparent_invalid", "Requests whose trace header was malformed or repeated, and replaced (each copy of a retransmitted request counts).", value=s.traceparent_invalid)
        yield CounterMetricFamily("sip_traceparent_joined", "New call entries (dialogs and non-dialog requests) that joined an incoming trace context.", value=s.traceparent_joined)
        yield CounterMetricFamily("sip_stray_responses", "Responses whose top Via was not this proxy's; dropped (RFC 3261 16.7).", value=s.stray_responses)
        yield CounterMetricFamily("sip_unroutable_requests", "Requests with no usable next hop.", value=s.unroutable)
        yield CounterMetricFamily("sipwatch_records_dropped", "Finished call/transaction records lost because exporters lagged.", value=s.records_dropped)
        yield CounterMetricFamily("sipwatch_log_lines_dropped", "Log lines dropped because the reader of stdout fell behind (forwarding never waits for it).", value=getattr(s, "log_lines_dropped", 0))
        yield CounterMetricFamily("sipwatch_gc_deep_collections", "Deep garbage collections (unexplained memory growth); each stops forwarding while it runs.", value=getattr(s, "gc_deep", 0))
        yield CounterMetricFamily("sipwatch_gc_deep_seconds", "Seconds forwarding stood still in deep garbage collections.", value=getattr(s, "gc_deep_seconds", 0.0))
        yield GaugeMetricFamily("sip_active_calls", "Answered calls not yet ended by BYE.", value=s.active_calls)
        yield GaugeMetricFamily("sipwatch_overloaded", "1 while new dialogs are shed by every path (UDP receive queues above the high-water mark, or sip-signaling's TCP backlog standing).", value=int(s.overloaded))
        dropped = CounterMetricFamily("sip_dropped", "Datagrams not forwarded, by reason (a fixed set).", labels=["reason"])
        counts = getattr(s, "dropped", None) or [0] * len(DROP_REASONS)
        for i, reason in enumerate(DROP_REASONS):
            dropped.add_metric([reason], counts[i] if i < len(counts) else 0)
        yield dropped
        yield CounterMetricFamily("sip_forks", "2xx answers to an INVITE already answered with another To-tag (forking), forwarded.", value=getattr(s, "forks", 0))
        yield CounterMetricFamily("sip_drain_rejected", "Requests of new dialogs answered 503 (Retry-After) while the sidecar was draining (a retransmission answered again counts again).", value=getattr(s, "drain_rejected", 0))
        yield CounterMetricFamily("sip_body_truncated", "Datagrams whose bytes past Content-Length were discarded (RFC 3261 18.3).", value=getattr(s, "body_truncated", 0))
        yield CounterMetricFamily("sip_overload_rejected", "Requests of new dialogs answered 503 (Retry-After) because the receive queues were too long (a retransmission answered again counts again).", value=s.overload_rejected)
        gto = CounterMetricFamily("sip_gateway_timeouts", "Requests sip-signaling sent toward the gateway side with no final response within Timer B/F (its own silence is sip_transaction_timeouts, on the signaling port).", labels=["method"])
        counts = getattr(s, "gateway_timeouts", None) or [0] * len(_METHOD_NAMES)
        for mi, m in enumerate(_METHOD_NAMES):
            if counts[mi] or mi == 0:
                gto.add_metric([m], counts[mi])
        yield gto


class SignalingCollector(_Guarded):
    """The signaling hop's view: RTT per method, timeouts, send errors, span export."""

    def __init__(self, stats: Stats, clock, on_error=None):
        self.stats = stats
        self.clock = clock
        self.on_error = on_error

    def _collect(self):
        s = self.stats
        ring = s.ring
        ring.fold(self.clock())
        bounds = [_fmt_le(b) for b in RTT_BUCKETS_MS] + ["+Inf"]
        h = HistogramMetricFamily("signaler_rtt_milliseconds", "Request forwarded upstream (first copy) to first response's arrival, including 100 Trying.", labels=["method"])
        for mi, m in enumerate(_METHOD_NAMES):
            counts = ring.counts[mi]
            total = int(counts.sum())
            if not total:
                continue
            cum = 0
            buckets = []
            for bi, le in enumerate(bounds):
                cum += int(counts[bi])
                ex = ring.exemplars.get((mi, bi))
                if ex is not None:
                    buckets.append((le, cum, Exemplar({"trace_id": "%032x" % ex[0]}, ex[1], ex[2] or None)))
                else:
                    buckets.append((le, cum))
            h.add_metric([m], buckets, float(ring.sums[mi]))
        yield h
        to = CounterMetricFamily("sip_transaction_timeouts", "Requests sent to sip-signaling with no final response within Timer B/F.", labels=["method"])
        for mi, m in enumerate(_METHOD_NAMES):
            if s.timeouts[mi] or mi == 0:
                to.add_metric([m], s.timeouts[mi])
        yield to
        corr = CounterMetricFamily("sip_correlation", "Correlation headers on initial INVITEs, by header and what became of them (joined the call they name, named none, refused, malformed).", labels=["header", "result"])
        counts = getattr(s, "correlation", None) or []
        for ki, kind in enumerate(CORRELATION_KINDS):
            for ri, result in enumerate(CORRELATION_RESULTS):
                i = ki * len(CORRELATION_RESULTS) + ri
                corr.add_metric([kind, result], counts[i] if i < len(counts) else 0)
        yield corr
        yield CounterMetricFamily("sip_upstream_send_errors", "Datagrams the OS refused to send (e.g. ICMP port unreachable).", value=s.send_errors)
        yield CounterMetricFamily("sipwatch_spans_exported", "Spans accepted by the OTLP backend.", value=s.spans_exported)
        yield CounterMetricFamily("sipwatch_spans_dropped", "Spans dropped: export queue full or backend failing.", value=s.spans_dropped)
        yield CounterMetricFamily("sipwatch_span_worker_restarts", "Span worker processes started again after one died (spans are dropped while none runs).", value=s.span_worker_restarts)


class Metrics:
    """Both registries plus the call histograms fed from finished-call records."""

    def __init__(self, stats: Stats, clock, on_error=None):
        self.gateway = CollectorRegistry()
        self.signaling = CollectorRegistry()
        self.gateway.register(GatewayCollector(stats, on_error))
        self.signaling.register(SignalingCollector(stats, clock, on_error))
        for reg in (self.gateway, self.signaling):
            reg.register(InternalErrorsCollector(stats, on_error))
        for reg in (self.gateway, self.signaling):
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
        self.call_setup = Histogram("sip_call_setup_seconds", "Initial INVITE forwarded to first 18x or final response (RFC 6076 SRD).", buckets=CALL_SETUP_BUCKETS, registry=self.gateway)
        self.leg_setup = Histogram("sip_b2bua_leg_setup_seconds", "B2BUA legs joined by a correlation header: the named leg's initial INVITE to this leg's initial INVITE (the B2BUA's own latency).", buckets=LEG_SETUP_BUCKETS, registry=self.signaling)
        self.call_duration = Histogram("sip_call_duration_seconds", "Answered calls: 2xx to the final response to BYE.", buckets=CALL_DURATION_BUCKETS, registry=self.gateway)

    def observe_call(self, call) -> None:
        if not call.is_call:
            return
        if call.t_setup is not None:
            self.call_setup.observe(call.t_setup - call.t_start)
        if call.t_answer is not None and call.t_end is not None:
            self.call_duration.observe(max(0.0, call.t_end - call.t_answer))
        if getattr(call, "joined_by", None):
            self.leg_setup.observe(max(0.0, call.t_start - call.gap_start))

    def observe_calls(self, calls, on_error=None) -> None:
        """``observe_call`` of each call, the histograms updated once for all of them (see
        :func:`observe_all`). A call whose figures cannot be read is reported to
        ``on_error("metrics", exc)`` and leaves out what it had not given yet, as
        ``observe_call`` would have."""
        setup, duration, legs = call_figures(calls, on_error)
        observe_all(self.call_setup, setup)
        observe_all(self.call_duration, duration)
        observe_all(self.leg_setup, legs)


def observe_all(hist: Histogram, values: list) -> None:
    """``hist.observe(v)`` for every v, in order, at one lock round per touched bucket instead
    of two per value (prometheus-client's ``observe`` adds to the sum, then to the first bucket
    whose bound the value does not exceed). The sum is added to value by value, in order, so it
    is the same float; bucket counts are whole numbers, exact in any order."""
    if not values:
        return
    if len(values) == 1:
        hist.observe(values[0])
        return
    bounds = hist._upper_bounds
    total = hist._sum.get()
    counts: dict[int, int] = {}
    for v in values:
        total += v
        if v <= bounds[-1]:  # (a NaN is in no bucket: it is not <= any bound)
            i = bisect_left(bounds, v)
            counts[i] = counts.get(i, 0) + 1
    hist._sum.set(total)
    buckets = hist._buckets
    for i, n in counts.items():
        buckets[i].inc(n)


class TokenBucket:
    """A token bucket: ``take(now)`` is true at most ``per_second`` times a second, after a burst
    of ``burst``."""

    def __init__(self, per_second: float, burst: int):
        self.per_second = per_second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_second)
        self.last = now if self.last is None else max(self.last, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """A token taken for nothing returns (up to the burst)."""
        self.tokens = min(self.burst, self.tokens + 1.0)


class Listener:
    """A listening socket on the running loop whose connections are accepted at most as a
    :class:`TokenBucket` allows: past it, no accept for ACCEPT_PAUSE s (the kernel queues the
    rest, and drops what its queue cannot hold). ``admit(starting)`` decides at once whether an
    accepted connection is kept (``starting``: those accepted whose task has not reached
    ``serve`` yet), so the connections held never pass the server's bound by more than the ones
    it has just closed. Each one kept goes to ``serve(reader, writer)`` in a task. ``close()``
    and ``wait_closed()`` as asyncio's servers."""

    def __init__(self, sock: socket.socket, serve, admit, budget: TokenBucket, on_error=None, protocol=None,
                 connections=None):
        self.sock = sock
        self.serve = serve
        # a protocol factory instead of ``serve`` (no streams, no task after set-up), and how many
        # of its connections are open (``wait_closed`` waits for none)
        self.protocol = protocol
        self.connections = connections
        self.budget = budget
        self.on_error = on_error
        self.admit = admit
        self.starting = 0
        self.loop = asyncio.get_running_loop()
        self.tasks: set = set()
        self.closed = False
        self.paused: asyncio.TimerHandle | None = None
        self.pauses = 0
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        try:
            now = self.loop.time()
            for _ in range(ACCEPT_BATCH):  # (then the loop's other callbacks)
                if not self.budget.take(now):
                    self._pause()
                    return
                try:
                    conn, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    self.budget.give_back()  # (nothing was waiting)
                    return
                except OSError as exc:  # out of descriptors: a pause, not a loop spinning on it
                    self._pause()
                    if self.on_error is not None:
                        self.on_error("metrics", exc)
                    return
                if not self.admit(self.starting):
                    conn.close()
                    continue
                conn.setblocking(False)
                self.starting += 1
                task = self.loop.create_task(self._one(conn))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except Exception as exc:  # noqa: BLE001
            if self.on_error is not None:
                self.on_error("metrics", exc)

    def _pause(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        self.pauses += 1

    def _resume(self) -> None:
        self.paused = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    async def _one(self, conn: socket.socket) -> None:
        if self.protocol is not None:
            await self._one_protocol(conn)
            return
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except (OSError, asyncio.CancelledError):
            conn.close()
            return
        finally:
            self.starting -= 1
        await self.serve(reader, writer)

    async def _one_protocol(self, conn: socket.socket) -> None:
        """``conn`` to a protocol of ``self.protocol``: it leaves ``starting`` as the protocol is
        made (which counts itself among the server's connections), so that ``admit`` never
        counts a connection twice and closes an idle one it had room for."""
        made: list = []

        def factory():
            self.starting -= 1
            p = self.protocol()
            made.append(p)
            return p
        try:
            await self.loop.connect_accepted_socket(factory, conn)
        except (OSError, asyncio.CancelledError):
            conn.close()
            for p in made:  # made, never connected: no longer counted
                p.connection_lost(None)
        finally:
            if not made:
                self.starting -= 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.paused is not None:
            self.paused.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.connections is not None:  # (each is closed within its idle or write timeout)
            while self.connections():
                await asyncio.sleep(0.01)


async def serve_metrics(registry: CollectorRegistry, host: str, port: int, on_error=None,
                        max_connections: int = MAX_CONNECTIONS,
                        idle_timeout: float = IDLE_TIMEOUT, ready=None,
                        fresh: TokenBucket | None = None, accepts: TokenBucket | None = None) -> "Listener":
    """A minimal HTTP/1.1 server for /metrics, /healthz (alive: the loop answers) and /readyz on
    the running loop. ``ready()`` false (the proxy is draining) makes /readyz answer 503, so a
    readiness probe takes the pod out of rotation while liveness stays green.

    It holds at most ``max_connections`` connections: when full, the oldest connection that has
    not sent its request yet is closed to make room (so idle or slow clients cannot lock out a
    scrape), or, when every one is being answered, the new one is closed at once. A connection
    that sends no complete request head (at most MAX_HEAD bytes) within ``idle_timeout`` seconds
    is closed, and one that has not taken its answer within WRITE_TIMEOUT.

    An exposition is built for a scrape while ``fresh`` (FRESH_PER_SECOND past FRESH_BURST)
    allows; past it a scrape gets the last one built in its format, and connections are accepted
    while ``accepts`` (ACCEPT_PER_SECOND past ACCEPT_BURST) allows: so that a client scraping or
    connecting in a loop cannot take the loop from forwarding.
    """
    endpoint = _Endpoint(registry, on_error, max_connections, idle_timeout, ready,
                         fresh if fresh is not None else TokenBucket(FRESH_PER_SECOND, FRESH_BURST))
    return Listener(listening_socket(host, port), None, endpoint.admit,
                    accepts if accepts is not None else TokenBucket(ACCEPT_PER_SECOND, ACCEPT_BURST), on_error,
                    protocol=endpoint.connection, connections=endpoint.open_connections)


class _Endpoint:
    """One metrics port: its connections, its exposition budget and the last expositions built.

    Connections are protocols, not streams: a request head is answered in the callback that
    completes it, nothing waits in a task, and nothing a client does raises. (Stream handlers
    ended by a client that closed early left the reader and its buffer of up to 64 KB in a
    reference cycle through the exception; the proxy's collector policy leaves cycles to its
    rare deep collections, and four clients doing that grew the process by 65 MB a second.)"""

    def __init__(self, registry, on_error, max_connections: int, idle_timeout: float, ready, budget: TokenBucket):
        self.registry = registry
        self.on_error = on_error
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.ready = ready
        self.budget = budget
        self.loop = asyncio.get_running_loop()
        self.waiting: dict[_Request, None] = {}  # connected, no request head yet: oldest first
        self.busy: set[_Request] = set()  # answered, the answer not yet taken
        # the last exposition built in each of the two formats served: (body, content type)
        self.built: dict[bool, tuple[bytes, str]] = {}

    def connection(self) -> "_Request":
        request = _Request(self)
        self.waiting[request] = None  # (counted from here: the listener stops counting it now)
        return request

    def open_connections(self) -> int:
        return len(self.waiting) + len(self.busy)

    def admit(self, starting: int) -> bool:
        """Room for a connection just accepted: past ``max_connections`` (those being set up
        included) the oldest that has not sent its request yet is closed to make it; False
        (closed at once) when every one is being set up or answered."""
        if starting + self.open_connections() < self.max_connections:
            return True
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        del self.waiting[oldest]
        oldest.close(abort=True)
        return True

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to a request head (GET or HEAD; the query is ignored)."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.split()
        method = parts[0] if parts else b""
        path = (parts[1] if len(parts) > 1 else b"/").split(b"?", 1)[0]
        extra = ""
        if method not in (b"GET", b"HEAD"):
            body, ctype, status, extra = b"method not allowed\n", "text/plain", "405 Method Not Allowed", \
                "Allow: GET, HEAD\r\n"
        elif path in (b"/metrics", b"/"):
            accept = b""
            for h in rest.split(b"\r\n"):
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"accept":
                    accept = value.strip()
            try:
                body, ctype = self.exposition(accept.decode("latin-1"))
                status = "200 OK"
            except Exception as exc:  # noqa: BLE001 - a collector failed: the sidecar's, counted
                if self.on_error is not None:
                    self.on_error("metrics", exc)
                body, ctype, status = b"metrics failed\n", "text/plain", "500 Internal Server Error"
        elif path == b"/healthz":
            body, ctype, status = b"ok\n", "text/plain", "200 OK"
        elif path == b"/readyz":
            if self.ready is None or self.ready():
                body, ctype, status = b"ready\n", "text/plain", "200 OK"
            else:
                body, ctype, status = b"draining\n", "text/plain", "503 Service Unavailable"
        else:
            body, ctype, status = b"not found\n", "text/plain", "404 Not Found"
        head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                    f"Connection: close\r\n\r\n").encode()
        return head_out if method == b"HEAD" else head_out + body

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for: OpenMetrics 1.0.0 or the text format
        0.0.4, whatever version or escaping it names (every name here is a legacy one, the same
        in each). Built while the budget allows, else the last one built in that format. (The
        client's own content type had been the cache key: a new version in each request was a
        build each time, past the budget, and an entry kept for good; a version that did not
        parse raised.)"""
        try:
            encoder, _ = choose_encoder(accept)
            om = getattr(encoder, "func", encoder) is openmetrics.generate_latest
        except Exception:  # noqa: BLE001 - an Accept header it cannot read: the text format
            om = False
        fresh_ok = self.budget.take(self.loop.time())
        built = self.built.get(om)
        if built is None or fresh_ok:
            # (every name here is a legacy one, so no escaping changes a byte of it; asking for
            # none skips the library's character-by-character escaping: 4.7 -> 3.0 ms for the
            # signaling side's exposition with a full set of exemplars)
            if om:
                built = (openmetrics.generate_latest(self.registry, escaping=openmetrics.ALLOWUTF8),
                         openmetrics.CONTENT_TYPE_LATEST)
            else:
                built = (generate_latest(self.registry, escaping=openmetrics.ALLOWUTF8), CONTENT_TYPE_PLAIN_0_0_4)
            self.built[om] = built
        return built


class _Request(asyncio.Protocol):
    """One connection to a metrics port: its request head gathered, answered, closed."""

    def __init__(self, endpoint: _Endpoint):
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        ep = self.endpoint
        if self not in ep.waiting:  # (made room for a newer one before it was connected)
            transport.abort()
            return
        self.timer = ep.loop.call_later(ep.idle_timeout, self.close, True)

    def data_received(self, data: bytes) -> None:
        if self.answered:  # (a body, or a second request on the connection: not read)
            return
        head = self.head
        searched = max(len(head) - 3, 0)
        head += data
        end = head.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(head) > MAX_HEAD:
                self.close(abort=True)
            return
        ep = self.endpoint
        self.answered = True
        ep.waiting.pop(self, None)
        ep.busy.add(self)
        request = bytes(head[:end])
        self.head = bytearray()
        try:
            response = ep.answer(request)
        except Exception as exc:  # noqa: BLE001 - never out of a callback
            if ep.on_error is not None:
                ep.on_error("metrics", exc)
            response = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        if self.timer is not None:
            self.timer.cancel()
        self.timer = ep.loop.call_later(WRITE_TIMEOUT, self.close, True)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()  # (once the answer is written)

    def eof_received(self) -> bool:
        return False  # (the transport closes: a half-closed client gets no answer)

    def connection_lost(self, exc) -> None:
        ep = self.endpoint
        ep.waiting.pop(self, None)
        ep.busy.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def close(self, abort: bool = False) -> None:
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on (host, port) with ACCEPT_BACKLOG, for :class:`Listener`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(ACCEPT_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

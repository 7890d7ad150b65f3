"""Hot-path measurement sink: plain integer counters and a numpy RTT ring buffer.

The proxy writes here once per datagram with list-index increments and two array stores; no
labels are resolved, no locks are taken, no histogram is touched. The Prometheus collectors in
:mod:`sipwatch.metrics` read these at scrape time and fold the ring into cumulative buckets
(:meth:`RttRing.fold`), on the same event loop, so writer and reader never run at once.
"""
from __future__ import annotations

from typing import Any

METHODS = (
    b"INVITE", b"ACK", b"BYE", b"CANCEL", b"REGISTER", b"OPTIONS", b"PRACK", b"UPDATE",
    b"INFO", b"SUBSCRIBE", b"NOTIFY", b"REFER", b"MESSAGE", b"PUBLISH", b"OTHER",
)
METHOD_INDEX = {m: i for i, m in enumerate(METHODS)}
OTHER = METHOD_INDEX[b"OTHER"]
INVITE, ACK, BYE, CANCEL, OPTIONS = (METHOD_INDEX[m] for m in (b"INVITE", b"ACK", b"BYE", b"CANCEL", b"OPTIONS"))

DIRECTIONS = ("from_gateway", "from_signaling")
FROM_GATEWAY, FROM_SIGNALING = 0, 1

OUTCOMES = ("answered", "redirected", "rejected_4xx", "rejected_5xx", "rejected_6xx", "cancelled",
            "timeout")
ANSWERED, REDIRECTED, REJ4, REJ5, REJ6, CANCELLED, TIMEOUT = range(7)

# Why a datagram was not forwarded: a fixed set, so ``sip_dropped_total{reason}`` stays bounded.
DROP_REASONS = (
    "not_sip",             # no SIP start line (and not a CRLF keep-alive)
    "malformed_header",    # header line without a name and colon, bad name bytes, bad folding
    "control_bytes",       # NUL or another control byte in the header section (bytes past 0x7f pass)
    "bad_content_length",  # non-numeric, conflicting, or more than the bytes that arrived
    "missing_header",      # no Via, Call-ID, CSeq, From or To; CSeq method differs
    "bad_via",             # a Via value we cannot read
    "too_many_headers",    # more Via values, Route values or header lines than the caps
    "out_of_range",        # CSeq >= 2**31, Max-Forwards > 255, port outside 1-65535, status
    "too_large",           # the forwarded message would not fit a UDP datagram (513 sent)
    "stray_response",      # a response to no request this proxy forwarded (bad or foreign branch)
    "next_hop_denied",     # a request from signaling toward a next hop not allowed (403 sent)
    "unroutable",          # no usable next hop (416 sent)
    "internal_error",      # the core raised; counted in sipwatch_internal_errors_total too
)
(DROP_NOT_SIP, DROP_MALFORMED_HEADER, DROP_CONTROL_BYTES, DROP_BAD_CONTENT_LENGTH, DROP_MISSING_HEADER,
 DROP_BAD_VIA, DROP_TOO_MANY_HEADERS, DROP_OUT_OF_RANGE, DROP_TOO_LARGE, DROP_STRAY_RESPONSE,
 DROP_NEXT_HOP_DENIED, DROP_UNROUTABLE, DROP_INTERNAL_ERROR) = range(len(DROP_REASONS))

# What became of a correlation header on an initial INVITE (``sip_correlation_total{header,result}``,
# header = sipwatch.correlation.KINDS): joined the call it names, named no call seen, named a call
# it may not join (ended, another party's, group full), or had no usable value.
CORRELATION_RESULTS = ("joined", "unmatched", "refused", "malformed")
CORR_JOINED, CORR_UNMATCHED, CORR_REFUSED, CORR_MALFORMED = range(4)

# Components that catch and count their own failures (``sipwatch_internal_errors_total``).
# "hep": the HEP mirror's tap raised; the message itself was forwarded before it was called.
COMPONENTS = ("datagram", "send", "tick", "log", "metrics", "spans", "hep")


def outcome_of(status: int, cancelled: bool) -> int:
    """Bounded outcome label index of an initial INVITE's final response."""
    if status < 300:
        return ANSWERED
    if cancelled and status == 487:
        return CANCELLED
    if status < 400:
        return REDIRECTED
    return (REJ4, REJ5, REJ6)[min(status // 100, 6) - 4]

# signaler_rtt_milliseconds buckets: dense where SIP answers (1-300 ms), then out to Timer B.
RTT_BUCKETS_MS = (1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 250, 300, 500, 1000, 2000, 5000, 10000,
                  32000)


def method_index(method: bytes) -> int:
    return METHOD_INDEX.get(method, OTHER)


class RttRing:
    """Fixed-size ring of (method, rtt_ms, trace_id) samples, folded into bucket counts.

    ``add`` is the only hot-path call. ``fold`` runs at scrape time, or from ``add`` itself
    when the ring is full, so no sample is ever overwritten before it was counted.
    """

    def __init__(self, size: int = 1 << 16, buckets=RTT_BUCKETS_MS):
        import numpy as np  # here, not at the top: a capture analysis that keeps no ring never loads it

        self.size = size
        # numpy arrays, written through memoryviews: a memoryview item store costs about half
        # of a numpy scalar store; fold() works on the arrays themselves, no copy
        self.rtt = np.zeros(size, dtype=np.float64)
        self.method = np.zeros(size, dtype=np.int64)
        self._rtt_w: Any = memoryview(self.rtt)  # type: ignore[arg-type]  # (numpy's stubs)
        self._method_w: Any = memoryview(self.method)  # type: ignore[arg-type]
        self.trace = [0] * size  # trace ids (int) for exemplars
        self.n = 0  # samples written since the last fold
        self.bounds = np.asarray(buckets, dtype=np.float64)
        nm = len(METHODS)
        # counts[m, i] = samples of method m in bucket i (last index = +Inf), not cumulative
        self.counts = np.zeros((nm, len(buckets) + 1), dtype=np.int64)
        self.sums = np.zeros(nm, dtype=np.float64)
        # newest sample per (method, bucket) for exemplars: (trace_id, value_ms, when)
        self.exemplars: dict[tuple[int, int], tuple[int, float, float]] = {}
        self.folded_at = 0.0

    def add(self, midx: int, rtt_ms: float, trace_id: int) -> None:
        n = self.n
        self._rtt_w[n] = rtt_ms
        self._method_w[n] = midx
        self.trace[n] = trace_id
        n += 1
        self.n = n
        if n == self.size:
            self.fold()

    def fold(self, now: float = 0.0) -> None:
        n = self.n
        if not n:
            return
        import numpy as np

        rtt = self.rtt[:n]
        meth = self.method[:n]
        idx = np.searchsorted(self.bounds, rtt, side="left")
        # (method, bucket) as one key: a count per key in one pass, and the last sample of each
        # (its exemplar) by a maximum per key; no sort (np.unique sorted the whole ring, and the
        # fold of a full ring runs inside the datagram callback that filled it)
        counts = self.counts
        nb = counts.shape[1]
        keys = meth * nb + idx
        counts += np.bincount(keys, minlength=counts.size).reshape(counts.shape)
        self.sums += np.bincount(meth, weights=rtt, minlength=len(METHODS))
        last = np.full(counts.size, -1, dtype=np.int64)
        np.maximum.at(last, keys, np.arange(n, dtype=np.int64))
        for k in np.flatnonzero(last >= 0).tolist():
            j = int(last[k])
            self.exemplars[(k // nb, k % nb)] = (self.trace[j], float(rtt[j]), now)
        self.n = 0
        self.folded_at = now


class NoRing(RttRing):
    """The ring of a :class:`Stats` nobody scrapes (``sipwatch analyze``, which reports RTTs from
    its transactions): samples are not kept, and numpy is never loaded for it."""

    def __init__(self) -> None:
        self.size = 0
        self.n = 0

    def add(self, midx: int, rtt_ms: float, trace_id: int) -> None:
        pass

    def fold(self, now: float = 0.0) -> None:
        pass


class Stats:
    """Every counter the hot path touches, as flat lists indexed by small integers.

    ``ring_size=0``: no RTT ring (:class:`NoRing`), for a consumer that exports no metrics."""

    def failed(self, component: str, exc: BaseException) -> str:
        """A failure caught and survived in ``component``: counted, and its text kept for the
        log line the housekeeping writes (``ErrorReporter.catch_up``). Returns the text."""
        text = f"{type(exc).__name__}: {exc}"[:300]
        self.internal_errors[component] = self.internal_errors.get(component, 0) + 1
        self.internal_error_text[component] = text
        return text

    def __init__(self, ring_size: int = 1 << 16):
        nm = len(METHODS)
        self.requests = [0] * (nm * 2)  # [method * 2 + direction]
        self.requests_tcp = [0] * (nm * 2)  # the part of ``requests`` that came over TCP
        self.responses = [0] * (6 * 2)  # [(status // 100 - 1) * 2 + direction]
        self.request_retransmissions = 0
        self.response_retransmissions = 0
        self.parse_errors = 0
        self.keepalives = 0
        self.evicted_transactions = 0
        self.evicted_calls = 0
        self.loops = 0
        self.too_many_hops = 0
        self.traceparent_invalid = 0
        self.traceparent_joined = 0
        self.stray_responses = 0  # responses whose top Via is not ours
        self.unroutable = 0  # requests we could not find a next hop for
        self.send_errors = 0
        self.timeouts = [0] * nm  # requests sent to sip-signaling with no final response (Timer B/F)
        self.gateway_timeouts = [0] * nm  # ... sent by it toward the gateway side
        self.calls = [0] * len(OUTCOMES)
        self.active_calls = 0
        self.records_dropped = 0  # finished records the exporters did not drain in time
        self.log_lines_dropped = 0  # log lines the stdout writer dropped (its reader stalled)
        self.gc_deep = 0  # deep (full) garbage collections, which stop the loop (gcpolicy)
        self.gc_deep_seconds = 0.0  # how long they stopped it, in all
        self.spans_exported = 0  # written by the span exporter thread (single writer)
        self.spans_dropped = 0
        self.span_worker_restarts = 0  # span worker processes started in place of a dead one
        self.dropped = [0] * len(DROP_REASONS)  # [DROP_*]: datagrams not forwarded, by reason
        self.internal_errors = dict.fromkeys(COMPONENTS, 0)
        self.internal_error_text: dict[str, str] = {}  # each component's last failure, for its log line
        self.body_truncated = 0  # UDP bytes past Content-Length discarded (RFC 3261 18.3)
        self.forks = 0  # a 2xx with another To-tag for an INVITE already answered (forking)
        self.drain_rejected = 0  # new dialogs answered 503 while draining
        self.overload_rejected = 0  # 503s sent to new dialogs while the receive queues were long (retransmissions too)
        self.overloaded = False  # mirrors ProxyCore.overloaded for the metrics
        self.correlation = [0] * (3 * len(CORRELATION_RESULTS))  # [kind * 4 + CORR_*]
        self.ring = RttRing(ring_size) if ring_size else NoRing()
        # call histograms (seconds) are fed from finished-call records off the hot path

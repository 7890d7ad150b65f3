"""Live capture: watch SIP on an interface and export the proxy's Prometheus metrics from it.

``sipwatch capture --interface IFACE [--bpf FILTER] [--signaling HOST:PORT]
[--gateway-metrics HOST:PORT] [--signaling-metrics HOST:PORT]`` runs until SIGINT/SIGTERM.

Why dumpcap and not pyshark: capture runs in its own worker process either way, but pyshark
hands every packet through tshark's dissectors and a JSON/XML round trip (a few hundred packets
per second), while ``dumpcap -w -`` streams raw pcap records that the struct-based decoder of
:mod:`capture.pcapfile` turns into datagrams at ~100k packets per second, and only dumpcap
needs capture privileges. One asyncio loop reads the pipe, feeds the observer
(:class:`sipwatch.observer.Observer`: the proxy's own parser, Tracker and Stats) and serves
``/metrics`` through :mod:`sipwatch.metrics`, so scrapes never race the counters.

Direction labels follow the proxy: a message sent by ``--signaling`` (the address the proxy
would call its upstream) is ``from_signaling``, anything else ``from_gateway``. Capture on the
signaling hop (e.g. ``--bpf "udp port 5060"`` with sip-signaling on 5060) to see what the proxy
would measure there; the observer keys transactions per hop, so several hops in one capture are
counted separately (and every message is then counted once per hop).

RTP: UDP payloads with RTP's version bits go to :class:`sipwatch.rtp.RtpAnalyzer` (anything it
rejects still goes to the observer, which counts it as before); the SDP the observer sees ties
streams to calls. A stream is finished, and only then counted, when its call has ended and
``--rtp-grace`` seconds have passed, after ``--rtp-idle-timeout`` seconds without a packet, when
the table is full (``--rtp-max-streams``: the oldest stream is finished early and counted in
``rtp_stream_evictions_total``), or when the capture stops. The gateway-side registry then
carries, labelled only by ``codec`` (one of :data:`sipwatch.rtp.CODEC_LABELS`):
``rtp_streams_total``, ``rtp_packets_total``, ``rtp_packets_lost_total`` (RFC 3550 A.3's
cumulative loss: a sender that restarts its sequence numbers loses nothing by it, and a duplicate
does not hide a loss; Wireshark's Lost column, expected from the first to the last sequence
number minus received, read 29,850 of 30,000 for a restart, and ``analyze``'s report shows both),
``rtp_jitter_milliseconds`` (one observation per stream: its **maximum** RFC 3550
interarrival jitter, streams without a known clock rate left out) and ``rtp_mos`` (one
observation per stream: E-model MOS from its loss, codecs without G.113 figures left out); plus
``rtp_streams_active`` and ``rtp_stream_evictions_total``. Each finished call is logged as one
``call_summary`` JSON line whose ``rtp`` list holds its streams.

What the reader saw is exported too (:class:`DecoderMetrics`): ``sipwatch_capture_frames_total``,
``sipwatch_capture_encapsulated_frames_total{encapsulation}`` (VXLAN, GRE/ERSPAN, PPPoE, MPLS, ...),
``sipwatch_capture_undecoded_frames_total{type}`` (frames it cannot open, also logged once per new
type as ``capture_undecoded``), ``sipwatch_capture_sip_oversized_total`` (SIP/TCP messages over
``--max-sip-message``) and ``sipwatch_capture_reassembly_dropped_total{what}`` (datagrams and TCP
connections given up to keep the reassembly state bounded). Keep-alives on the SIP ports
(``hello``, ``jaK``, CRLF, STUN) count in ``sip_keepalives_total``, not as parse errors. A bug
that one frame or a housekeeping tick reaches is counted in ``sipwatch_internal_errors_total``
(``datagram``, ``tick``) and logged; the capture goes on.

Spans: ``--otlp-endpoint``, ``--otlp-protocol``, ``--spans-file`` and the OTEL_* variables work
as for the proxy (resource role ``capture``). Transaction spans are exported as their
transactions finish; a call's span waits, like its call summary, until its RTP streams are
finished (``--rtp-grace``) and then carries their ``rtp.*`` figures (see :mod:`sipwatch.tracing`).
A captured ``traceparent`` puts the call into the sender's trace (see :mod:`sipwatch.observer`).

HEP: ``--hep-listen udp:IP:PORT`` (or ``tcp:``, repeatable) takes SIP from Kamailio siptrace,
OpenSIPS, Asterisk or a capture agent instead of (or besides) ``--interface``, into the same
observer (:mod:`capture.hep_listen`); RTCP JSON reports join their call's ``rtp`` list
(:mod:`capture.hep_rtcp`). ``--hep-endpoint`` sends every SIP message captured (from either
source) on to a HEP collector (:mod:`sipwatch.hep_sender`), ``--hep-log`` each call summary too.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import time
from bisect import bisect_left
from collections import OrderedDict, deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sipwatch.hep_sender import (EndpointError, HepSender, add_hep_arguments, hep_options,
                                 parse_endpoint, summary_record)
from sipwatch.config import ConfigError, call_id_masker
from sipwatch.correlation import add_correlation_argument
from sipwatch.metrics import Metrics, _fmt_le, serve_metrics
from sipwatch.observer import Observer
from sipwatch.logs import ErrorReporter, JsonLog
from sipwatch.masking import MODES as MASK_MODES, add_call_id_mask_arguments
from sipwatch.rtp import CODEC_LABELS, RtpAnalyzer, RtpStream, codec_label
from sipwatch.stats import Stats
from sipwatch.tracing import SpanPipeline, add_otlp_arguments, rtp_figures

from .analyze import _size
from .hep_listen import HepReceiver
from .hep_rtcp import RtcpReports
from .pcapfile import KEEPALIVE_MAX, MAX_SIP_MESSAGE, Decoder, is_sip_keepalive

Addr = tuple[str, int]
PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 10**6), b"\x4d\x3c\xb2\xa1": ("<", 10**9),
              b"\xa1\xb2\xc3\xd4": (">", 10**6), b"\xa1\xb2\x3c\x4d": (">", 10**9)}
TICK = 0.2  # seconds between housekeeping runs (expiry, call histograms)


JITTER_BUCKETS_MS = (0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200)
MOS_BUCKETS = (1, 2, 2.5, 3, 3.5, 4, 4.2, 4.4, 5)
SWEEP = 1.0  # seconds between idle-stream sweeps
MAX_CALL_ENDPOINTS = 64  # SDP media ends remembered per call (re-offers add theirs; the oldest go)
MAX_CALL_STREAMS = 64  # finished streams listed in a call's summary (every one is counted in metrics)
# Finished records waiting for the next tick (it takes DRAIN_PER_TICK): past this, new ones are
# dropped and counted (sipwatch_records_dropped_total), as in the proxy. Unbounded, a wire of
# ACKs (one record each) faster than the ticks drain grew it by ~50,000 records a second.
MAX_FINISHED = 100_000
DRAIN_PER_TICK = 10_000


class _Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1  # le: a value on a bound belongs to it
        self.sum += v

    def buckets(self) -> list:
        out, cum = [], 0
        for b, n in zip(list(self.bounds) + ["+Inf"], self.counts):
            cum += n
            out.append((b if b == "+Inf" else _fmt_le(b), cum))
        return out


class RtpMonitor:
    """RTP streams of a live capture: finishing, per-codec totals and the per-call stream lists.

    ``analyzer.feed`` is the per-packet path; everything else runs from :meth:`tick` (the
    capture's housekeeping) or when a stream is evicted. Also a Prometheus collector.
    """

    def __init__(self, idle_timeout: float = 10.0, grace: float = 2.0, max_streams: int = 4000):
        self.analyzer = RtpAnalyzer(max_streams=max_streams, on_evict=self._evicted)
        self.idle_timeout = idle_timeout
        self.grace = grace
        self.max_pending = max(1000, 4 * max_streams)
        self.streams = dict.fromkeys(CODEC_LABELS, 0)
        self.packets = dict.fromkeys(CODEC_LABELS, 0)
        self.lost = dict.fromkeys(CODEC_LABELS, 0)
        self.jitter = {c: _Hist(JITTER_BUCKETS_MS) for c in CODEC_LABELS}
        self.mos = {c: _Hist(MOS_BUCKETS) for c in CODEC_LABELS}
        # finished streams of calls not yet summarised (OrderedDicts where the oldest entry is
        # given up when full: see RtpAnalyzer)
        self.by_call: OrderedDict[str, list[dict]] = OrderedDict()
        # entries in all of by_call's lists: at most max_listed (the oldest calls' lists go
        # first); max_pending lists of MAX_CALL_STREAMS each would be ~550 MB
        self.listed = 0
        self.max_listed = 16 * max_streams
        # SDP endpoints per call (oldest first, at most MAX_CALL_ENDPOINTS), dropped at its end;
        # at most RtpAnalyzer.MAX_MEDIA_ADDRS in all (the oldest calls' go first), as the
        # analyzer's own table
        self.call_endpoints: OrderedDict[bytes, dict] = OrderedDict()
        self.n_call_endpoints = 0
        self.pending: deque = deque()  # (deadline, call): ended calls waiting out the grace
        self.next_sweep = 0.0

    # -- input ----------------------------------------------------------------------------
    def add_sdp(self, call_id: bytes, body: bytes, src=None, dst=None, ts=None) -> None:
        eps = self.analyzer.add_sdp(call_id, body)
        ends = self.call_endpoints
        mine = ends.get(call_id)
        if mine is None:
            if len(ends) >= self.max_pending:
                self._forget(next(iter(ends)))
            mine = ends[call_id] = {}
        for ep in eps:  # newest last: a call's re-offers move its media, the oldest ends go first
            if ep in mine:
                del mine[ep]
            else:
                self.n_call_endpoints += 1
            mine[ep] = None
        while len(mine) > MAX_CALL_ENDPOINTS:
            ep = next(iter(mine))  # (64 at most: no long walk)
            del mine[ep]
            self.n_call_endpoints -= 1
            self._untie(call_id, ep)
        while self.n_call_endpoints > RtpAnalyzer.MAX_MEDIA_ADDRS and len(ends) > 1:
            self._forget(next(iter(ends)))

    def call_ended(self, call, now: float) -> None:
        """A finished call record (any kind): its streams end ``grace`` seconds from now."""
        self.pending.append((now + self.grace, call))

    # -- finishing ------------------------------------------------------------------------
    def tick(self, now: float) -> list[tuple]:
        """Finish due streams; returns ``[(call, rtp list)]`` for calls whose grace is over."""
        due = []
        pending = self.pending
        while pending and pending[0][0] <= now:
            due.append(pending.popleft()[1])
        if due or now >= self.next_sweep:
            self.next_sweep = now + SWEEP
            ending = {c.call_id.decode("utf-8", "replace") for c in due}
            idle_before = now - self.idle_timeout
            streams = self.analyzer.streams
            for key in [k for k, st in streams.items()
                        if st.last_ts <= idle_before or st.call_id in ending]:
                st = streams.pop(key)
                self._finish(st, "call_end" if st.call_id in ending else "idle")
        out = []
        for call in due:
            out.append((call, self._take_listed(call.call_id.decode("utf-8", "replace"))))
            self._forget(call.call_id)
        return out

    def _take_listed(self, call_sid: str) -> list[dict]:
        got = self.by_call.pop(call_sid, None) or []
        self.listed -= len(got)
        return got

    def stop(self) -> list[tuple]:
        """End of capture: every stream finished, every ended call's list handed out."""
        streams = self.analyzer.streams
        while streams:
            self._finish(streams.popitem(last=False)[1], "stop")
        due = [c for _, c in self.pending]
        self.pending.clear()
        out = [(c, self._take_listed(c.call_id.decode("utf-8", "replace"))) for c in due]
        for c in due:
            self._forget(c.call_id)
        return out

    def _forget(self, call_id: bytes) -> None:
        mine = self.call_endpoints.pop(call_id, ())
        self.n_call_endpoints -= len(mine)
        for ep in mine:
            self._untie(call_id, ep)

    def _untie(self, call_id: bytes, ep) -> None:
        """The media end ``ep`` no longer ties RTP to ``call_id`` (unless a later SDP gave it to
        another call)."""
        endpoints = self.analyzer.endpoints
        tie = endpoints.get(ep)
        if tie is not None and tie[0] == call_id:
            del endpoints[ep]

    def _evicted(self, st: RtpStream) -> None:
        self._finish(st, "evicted")

    def _finish(self, st: RtpStream, reason: str) -> None:
        if not st.media:  # keep-alives only: not a stream
            return
        s = st.summary()
        name = st.codec()
        codec = codec_label(name)
        self.streams[codec] += 1
        self.packets[codec] += st.packets
        self.lost[codec] += st.lost_rfc3550
        if st.clock:
            self.jitter[codec].observe(st.max_jitter)
        if s["mos"] is not None:
            self.mos[codec].observe(s["mos"])
        if st.call_id is None:
            return
        by_call = self.by_call
        if st.call_id not in by_call:
            while by_call and len(by_call) >= self.max_pending:
                self.listed -= len(by_call.popitem(last=False)[1])
        # past max_listed in all, other calls' lists go, the oldest first (a call's own list
        # grows on: a call already listed once grew every list to MAX_CALL_STREAMS, ~550 MB)
        while self.listed >= self.max_listed and by_call:
            oldest = next(iter(by_call))
            if oldest == st.call_id:
                if len(by_call) == 1:
                    break
                by_call.move_to_end(oldest)
                continue
            self.listed -= len(by_call.pop(oldest))
        entry = {
            "ssrc": s["ssrc"], "codec": name or None, "packets": st.packets, "lost": s["lost_rfc3550"],
            "lost_pct": round(min(st.lost_rfc3550 * 100.0 / max(st.expected_rfc3550, 1), 100.0), 2),
            "jitter_mean_ms": s["mean_jitter_ms"],
            "jitter_max_ms": s["max_jitter_ms"], "mos": s["mos"],
            "ended": reason,
        }
        listed = by_call.setdefault(st.call_id, [])
        if len(listed) < MAX_CALL_STREAMS:
            listed.append(entry)
            self.listed += 1
        else:  # (forged SSRCs to a call's media port: the streams that carried the most stay)
            i = min(range(len(listed)), key=lambda j: listed[j]["packets"])
            if listed[i]["packets"] < st.packets:
                listed[i] = entry

    # -- metrics --------------------------------------------------------------------------
    def collect(self):
        seen = [c for c in CODEC_LABELS if self.streams[c]]
        fams = (("rtp_streams", "Finished RTP streams (one direction of one SSRC).", self.streams),
                ("rtp_packets", "RTP packets received in finished streams.", self.packets),
                ("rtp_packets_lost", "RTP packets lost in finished streams (RFC 3550 A.3: a restart of "
                                     "the sequence numbers is not loss, a duplicate does not hide one).", self.lost))
        for name, doc, d in fams:
            f = CounterMetricFamily(name, doc, labels=["codec"])
            for c in seen:
                f.add_metric([c], d[c])
            yield f
        for name, doc, hists in (
                ("rtp_jitter_milliseconds", "Per finished stream: its maximum RFC 3550 interarrival "
                                            "jitter, ms.", self.jitter),
                ("rtp_mos", "Per finished stream: E-model MOS (ITU-T G.107, no delay term) from its "
                            "packet loss.", self.mos)):
            f = HistogramMetricFamily(name, doc, labels=["codec"])
            for c in seen:
                h = hists[c]
                if sum(h.counts):
                    f.add_metric([c], h.buckets(), h.sum)
            yield f
        yield GaugeMetricFamily("rtp_streams_active", "RTP streams being measured.",
                                value=len(self.analyzer.streams))
        yield CounterMetricFamily("rtp_stream_evictions", "RTP streams finished early because the "
                                  "stream table was full (--rtp-max-streams).",
                                  value=self.analyzer.evicted)
        yield CounterMetricFamily("rtp_ssrc_churn_packets", "RTP packets of new SSRCs past 16 on one "
                                  "media flow within 10 s: counted, not made streams.",
                                  value=self.analyzer.ssrc_churn)


def _addr(s: str) -> Addr:
    host, _, port = s.rpartition(":")
    return (host.strip("[]") or "0.0.0.0", int(port))


class DecoderMetrics:
    """What the capture reader saw, as Prometheus counters: frames read, frames opened through
    each encapsulation, frames it could not open (by link type, Ethernet type, IP protocol or
    tunnel: bounded, see :data:`capture.pcapfile.MAX_UNDECODED_TYPES`) and SIP/TCP messages over
    ``--max-sip-message``, so a tap delivering something unreadable is visible, not silent; and the
    reassemblies given up to keep the reader's memory bounded (forged or lost fragments, TCP
    connections holding the most: see :mod:`capture.pcapfile`)."""

    def __init__(self, counters: dict):
        self.c = counters

    def collect(self):
        c = self.c
        yield CounterMetricFamily("sipwatch_capture_frames", "Frames read from the capture.",
                                  value=c.get("frames", 0))
        enc = CounterMetricFamily("sipwatch_capture_encapsulated_frames",
                                  "Frames opened through an encapsulation (tunnel, PPPoE, MPLS, ...).",
                                  labels=["encapsulation"])
        for kind, n in sorted(c.get("encapsulations", {}).items()):
            enc.add_metric([kind], n)
        yield enc
        und = CounterMetricFamily("sipwatch_capture_undecoded_frames",
                                  "Frames the reader could not open; SIP inside them is not counted.",
                                  labels=["type"])
        for kind, n in sorted(c.get("undecoded_types", {}).items()):
            und.add_metric([kind], n)
        yield und
        yield CounterMetricFamily("sipwatch_capture_sip_oversized", "SIP messages over TCP larger "
                                  "than --max-sip-message, skipped.", value=c.get("sip_oversized", 0))
        given_up = CounterMetricFamily("sipwatch_capture_reassembly_dropped",
                                       "Fragmented datagrams and TCP connections the reader gave up "
                                       "reassembling to stay within its memory bounds.", labels=["what"])
        given_up.add_metric(["ip_fragments"], c.get("fragments_dropped", 0))
        given_up.add_metric(["tcp_connections"], c.get("tcp_flows_dropped", 0))
        yield given_up
        yield CounterMetricFamily("sipwatch_capture_tcp_gaps", "Holes in TCP streams never filled "
                                  "(bytes the capture missed): given up, framing resumed at the next "
                                  "SIP start line; messages across them are missing.",
                                  value=c.get("tcp_gaps", 0))
        yield CounterMetricFamily("sipwatch_capture_tcp_syn_ignored", "SYNs on connections that carried "
                                  "data (the stream goes on unless data follows the SYN), or that would "
                                  "have pushed out a connection carrying data from a full table.",
                                  value=c.get("tcp_syn_ignored", 0))
        yield CounterMetricFamily("sipwatch_capture_tcp_resyncs", "TCP streams found elsewhere than "
                                  "expected (reopened, forged SYN or segment, more than a window lost): "
                                  "reassembly started again there.",
                                  value=c.get("tcp_resyncs", 0) + c.get("tcp_stream_switches", 0))


class LiveCapture:
    def __init__(self, interface: str, bpf: str, signaling: Addr | None, timer_b: float = 32.0,
                 rtp: RtpMonitor | None = None, log: JsonLog | None = None, spans=None,
                 stats: Stats | None = None, timer_c: float = 180.0, correlation: str = "X-CID,Session-ID"):
        self.interface = interface
        self.bpf = bpf
        self.signaling = signaling
        self.rtp = rtp or RtpMonitor()
        self.log = log or JsonLog("sipwatch-capture")
        self.spans = spans  # a SpanPipeline, or None
        self.observer = Observer(timer_b=timer_b, stats=stats, signaling=signaling,
                                 on_sdp=self.rtp.add_sdp, timer_c=timer_c, correlation=correlation)
        self.observer.tracker.finished_max = MAX_FINISHED
        if spans is not None:
            self.observer.sample_ratio = spans.sample_ratio
        self.metrics = Metrics(self.observer.stats, time.time)
        self.metrics.gateway.register(self.rtp)
        self.counters: dict = {"frames": 0}
        self.decoder = Decoder(self.counters)
        self.metrics.gateway.register(DecoderMetrics(self.counters))
        self.proc: asyncio.subprocess.Process | None = None
        self.header = b""
        self.packets = 0
        self.undecoded_logged = 0
        self.undecoded_kinds_logged: set = set()
        self.feed = self.observer.feed  # every SIP message captured goes here
        self.hep: HepSender | None = None  # HEP copies of what is captured (--hep-endpoint)
        self.hep_log = False
        self.rtcp = RtcpReports()  # RTCP reports received as HEP type 5, per call
        # failures caught and survived: sipwatch_internal_errors_total{component}, logged
        self.errors = ErrorReporter(self.log, self.observer.stats.internal_errors)

    def feed_and_send(self, payload: bytes, src, dst, ts: float, transport: str = "udp") -> bool:
        """Observer, plus a HEP copy (set as ``feed`` when there is a --hep-endpoint)."""
        self.hep.tap(payload, src, dst, ts, transport)
        return self.observer.feed(payload, src, dst, ts, transport)

    async def start(self) -> None:
        args = ["dumpcap", "-q", "-P", "-i", self.interface, "-w", "-"]
        if self.bpf:
            args[5:5] = ["-f", self.bpf]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        line = (await self.proc.stderr.readline()).decode(errors="replace").strip()
        try:
            # dumpcap writes the file header once the device is open and the filter set
            self.header = await self.proc.stdout.readexactly(24)
        except asyncio.IncompleteReadError:
            self.header = b""
        if "Capturing on" not in line or self.header[:4] not in PCAP_MAGIC:
            rest = (await self.proc.stderr.read()).decode(errors="replace")
            await self.proc.wait()
            raise RuntimeError(f"dumpcap did not start: {line} {rest}".strip())

    async def read(self) -> None:
        """Decode pcap records from dumpcap's stdout until it ends."""
        out = self.proc.stdout
        head = self.header
        end, div = PCAP_MAGIC[head[:4]]
        linktype = struct.unpack_from(end + "I", head, 20)[0] & 0x0FFFFFFF
        rec = struct.Struct(end + "IIII").unpack
        feed, frame = self.feed, self.decoder.frame
        rtp = self.rtp.analyzer.feed
        stats = self.observer.stats
        while True:
            try:
                sec, frac, incl, _ = rec(await out.readexactly(16))
                data = await out.readexactly(incl)
            except asyncio.IncompleteReadError:
                return
            self.counters["frames"] += 1
            try:
                for p in frame(linktype, data, (sec * div + frac) / div):
                    self.packets += 1
                    pl = p.payload
                    # RTP/RTCP start with version 2 (0b10......); no SIP start line or keep-alive does
                    if pl and pl[0] >> 6 == 2 and p.transport == "udp" and rtp(pl, p.src, p.dst, p.ts):
                        continue
                    if len(pl) <= KEEPALIVE_MAX and p.transport == "udp" and is_sip_keepalive(pl):
                        stats.keepalives += 1  # "hello", "jaK", CRLF, STUN: not a parse error
                        continue
                    feed(pl, p.src, p.dst, p.ts, p.transport)
            except Exception as exc:  # noqa: BLE001 - a bug one frame reaches must not end the capture
                self.errors.report("datagram", exc)

    def housekeeping(self, now: float | None = None) -> None:
        try:
            self._housekeeping(now)
        except Exception as exc:  # noqa: BLE001 - counted and logged; the next tick tries again
            self.errors.report("tick", exc)
        self.errors.catch_up(self.observer.stats.internal_error_text)  # counted inside the core

    def _housekeeping(self, now: float | None) -> None:
        # capture time is wall time here, so the clock can expire what the packets no longer do
        now = time.time() if now is None else now
        self.observer.tracker.expire(now)
        txs = []
        for rec in self.observer.drain_finished(DRAIN_PER_TICK):
            kind, obj = rec
            if kind == "call":
                self.metrics.observe_call(obj)
                self.rtp.call_ended(obj, now)
            else:
                txs.append(rec)
        if self.spans is not None and txs:
            self.spans.submit(txs)
        self._summaries(self.rtp.tick(now))
        undecoded = self.counters.get("undecoded", 0)
        if undecoded > self.undecoded_logged:  # loudly, but once per new kind of frame
            kinds = self.counters.get("undecoded_types", {})
            if set(kinds) - self.undecoded_kinds_logged:
                self.undecoded_kinds_logged.update(kinds)
                self.log.warning("frames not decoded: SIP inside them is not counted",
                                 "capture_undecoded", frames=undecoded, types=dict(kinds))
            self.undecoded_logged = undecoded
        if self.hep is not None:
            self.hep.flush()

    def finish(self) -> None:
        """Capture stopped: finish every RTP stream and log the calls still in their grace."""
        self._summaries(self.rtp.stop())

    def _summaries(self, ended: list) -> None:
        calls = []
        for call, streams in ended:
            if self.rtcp.by_call:
                streams = streams + self.rtcp.take(call.call_id)
            if call.is_call:
                self.log.call_summary(call, streams)
                if self.hep is not None and self.hep_log:
                    self.hep.call_summary(call.call_id, summary_record(call, self.log.mask_mode,
                                                                       self.log.call_id_mask),
                                          time.time())
                if streams or call.t_answer is not None:
                    call.rtp = rtp_figures((r["packets"], r["lost"], r["jitter_max_ms"], r["mos"])
                                           for r in streams)
                calls.append(("call", call))
        if self.spans is not None and calls:
            self.spans.submit(calls)

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _run(args) -> int:
    rtp = RtpMonitor(args.rtp_idle_timeout, args.rtp_grace, args.rtp_max_streams)
    stats = Stats()
    try:
        call_id_mask = call_id_masker(args)
    except ConfigError as exc:
        sys.stderr.write(f"sipwatch capture: error: {exc}\n")
        return 2
    spans = SpanPipeline.for_capture("capture", stats, args.otlp_endpoint, args.otlp_protocol,
                                     args.spans_file, args.mask_numbers, call_id_mask=call_id_mask)
    lc = LiveCapture(args.interface, args.bpf, _addr(args.signaling) if args.signaling else None,
                     args.timer_b, rtp, spans=spans, stats=stats, timer_c=args.timer_c,
                     correlation=args.correlation_headers,
                     log=JsonLog("sipwatch-capture", mask_mode=args.mask_numbers, call_id_mask=call_id_mask))
    lc.decoder.max_sip_message = args.max_sip_message
    try:
        hep = hep_options(lambda name, default=None: (getattr(args, name.replace("-", "_")) or default,
                                                      "--" + name),
                          lambda name: getattr(args, name.replace("-", "_")))
        listens = [parse_endpoint(x, "--hep-listen") for x in args.hep_listen]
    except EndpointError as exc:
        sys.stderr.write(f"sipwatch capture: error: {exc}\n")
        return 2
    if hep["hep_endpoint"] is not None:
        lc.hep = HepSender(hep["hep_endpoint"], hep["hep_capture_id"], hep["hep_auth_key"],
                           hep["hep_node_name"])
        lc.hep_log = hep["hep_log"]
        lc.feed = lc.feed_and_send
        lc.metrics.gateway.register(lc.hep)
    receiver = None
    if listens:
        receiver = HepReceiver(lc.feed, hep["hep_auth_key"], on_rtcp=lc.rtcp.add, on_error=lc.errors.report)
        lc.metrics.gateway.register(receiver)
        lc.metrics.gateway.register(lc.rtcp)
        try:
            for proto, addr in listens:
                await receiver.listen(proto, addr)
        except OSError as exc:
            sys.stderr.write(f"sipwatch capture: --hep-listen: {exc}\n")
            return 1
    servers = []
    for reg, spec in ((lc.metrics.gateway, args.gateway_metrics), (lc.metrics.signaling, args.signaling_metrics)):
        if spec != "off":
            host, port = _addr(spec)
            servers.append(await serve_metrics(reg, host, port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    if args.interface:
        try:
            await lc.start()
        except (RuntimeError, OSError) as exc:
            sys.stderr.write(f"sipwatch capture: {exc}\n")
            return 1
    log = lc.log
    log.info("capture started", "capturing", interface=args.interface, bpf=args.bpf,
             hep_listen=args.hep_listen, hep_endpoint=args.hep_endpoint)
    # HEP only: nothing to read from dumpcap, the receiver runs until the stop signal
    reader = asyncio.create_task(lc.read() if args.interface else asyncio.Event().wait())
    stopper = asyncio.create_task(stop.wait())
    rc = 0
    while True:
        done, _ = await asyncio.wait({reader, stopper}, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
        lc.housekeeping()
        if stopper in done:
            break
        if reader in done:
            rc = 1  # dumpcap went away without being asked to
            err = (await lc.proc.stderr.read()).decode(errors="replace").strip()
            sys.stderr.write(f"sipwatch capture: capture ended: {err}\n")
            break
    await lc.stop()
    if not args.interface:
        reader.cancel()
    elif not reader.done():
        try:
            await asyncio.wait_for(reader, 2)  # what dumpcap flushed before exiting
        except asyncio.TimeoutError:
            reader.cancel()
    if receiver is not None:
        receiver.close()
    lc.housekeeping()
    lc.finish()
    if lc.hep is not None:
        lc.hep.flush()
        lc.hep.close()
    if spans is not None:
        spans.shutdown()
    for srv in servers:
        srv.close()
    log.info("capture stopped", "stopped", frames=lc.counters["frames"], packets=lc.packets,
             sip=lc.observer.sip_messages, rtp_streams=sum(rtp.streams.values()),
             rtp_evicted=rtp.analyzer.evicted, spans_exported=stats.spans_exported,
             spans_dropped=stats.spans_dropped)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sipwatch capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--interface", "-i", default=None,
                    help="interface to capture on (dumpcap); may be left out with --hep-listen")
    ap.add_argument("--hep-listen", action="append", default=[], metavar="udp:IP:PORT|tcp:IP:PORT",
                    help="receive HEPv2/v3 here (Kamailio siptrace, OpenSIPS, Asterisk, agents); "
                         "repeatable; --hep-auth-key, when set, must match")
    ap.add_argument("--bpf", default="udp", help="capture filter (default %(default)r)")
    ap.add_argument("--signaling", default=None,
                    help="sip-signaling HOST:PORT: its messages are labelled from_signaling")
    ap.add_argument("--gateway-metrics", default="0.0.0.0:13012", help="HOST:PORT or 'off'")
    ap.add_argument("--signaling-metrics", default="0.0.0.0:13022", help="HOST:PORT or 'off'")
    ap.add_argument("--timer-b", type=float, default=32.0,
                    help="seconds a request may go without any response (RFC 3261 Timer B/F)")
    ap.add_argument("--timer-c", type=float, default=180.0,
                    help="seconds an INVITE may ring after a provisional (RFC 3261 Timer C)")
    ap.add_argument("--mask-numbers", choices=MASK_MODES, default="partial",
                    help="phone numbers in logs and spans: none, partial, full (default partial)")
    ap.add_argument("--rtp-idle-timeout", type=float, default=10.0,
                    help="finish an RTP stream after this many seconds without a packet (%(default)s)")
    ap.add_argument("--rtp-grace", type=float, default=2.0,
                    help="seconds after its call ended before a stream is finished (%(default)s)")
    ap.add_argument("--rtp-max-streams", type=int, default=4000,
                    help="RTP streams measured at once; the oldest is finished early beyond (%(default)s)")
    ap.add_argument("--max-sip-message", type=_size, default=MAX_SIP_MESSAGE, metavar="BYTES",
                    help="largest SIP message framed over TCP (default 1 MiB); larger ones are skipped "
                         "and counted")
    add_call_id_mask_arguments(ap)
    add_correlation_argument(ap)
    add_otlp_arguments(ap)
    add_hep_arguments(ap)
    args = ap.parse_args(argv)
    if not args.interface and not args.hep_listen:
        ap.error("give --interface or --hep-listen (or both)")
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wires the proxy together: UDP socket, metrics endpoints, periodic housekeeping, drain, shutdown.

The housekeeping tick (every 200 ms, off the per-datagram path) expires transactions, drains
finished calls and transactions into the call histograms, the JSON log and the span pipeline.
Each of those steps catches its own failures: they are counted in
``sipwatch_internal_errors_total{component}``, logged at most once per component every 10 s,
and the proxy carries on. Nothing a peer sends may stop the process.

Signals:

* SIGTERM (or SIGINT): drain. New dialogs are answered ``503`` with ``Retry-After`` (the core
  does that while ``core.draining`` is set), in-dialog requests and responses keep flowing until
  no call is active and no INVITE is pending, or ``--drain-timeout`` passed. Then calls still
  open are written with ``ended_by: "shutdown"``, spans are flushed and the process exits.
  A second SIGTERM/SIGINT stops at once.
* SIGHUP: nothing to reload; the spans file is re-opened (log rotation). The process stays up.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
from collections import deque

from . import heap
from .config import ProxySettings
from .gcpolicy import GcPolicy
from .handoff import forget_events, let_go_all, summarize_all, summary_tuples, take_slice
from .hep_sender import sender_for_proxy, summary_record
from .core import CoreConfig, ProxyCore
from .logs import ErrorReporter, JsonLog, interleaves, masked_error_text
from .masking import CallIdMasker
from .metrics import Metrics, serve_metrics
from .state import EXPIRE_STEP
from .stats import INVITE, Stats
from .tcp import TcpEdge
from .transport import OVERLOAD_SAMPLE, UdpEdge, epoch_clock

# Housekeeping runs often so each run is short: at 1000 calls/s a 200-ms tick wrote 200 call
# summaries at once and stalled forwarding for 13-18 ms; every 20 ms it is about 1 ms of work.
TICK = 0.02
# finished calls handled in one callback before the loop polls its sockets again: live (1000
# calls/s, every feature on, a 2-core machine) a slice of 6 took 115 µs of CPU at p50 and 600 at
# p99 (its calls' summaries, histograms and span records with the transactions' records around
# them), a slice of 2 took 50 µs but ~30% more CPU in all (each slice frames its span records,
# updates the histograms and is a callback); 3 is the middle
CALLS_PER_SLICE = 3
RECORDS_PER_SLICE = 32
# records taken from the core into the backlog while fewer than this wait there: past it they
# wait in the core's own bounded queue (100,000; past it dropped and counted in
# sipwatch_records_dropped_total), so records finished faster than the slices run them cannot
# pile up here without bound
MAX_BACKLOG = 100_000
DRAIN_CHECK_EVERY = 10  # ticks: the drain check walks the transaction table
ALIVE_EVERY = 50  # ticks (1 s): the --alive-file's modification time is set
# ticks between reads of the span pipeline's health (its failures, the spans file's state): the
# worker reports at most every 100 ms (span_worker.STATUS_EVERY), and each read cost ~45 µs live
HEALTH_EVERY = 5
DRAIN_LINGER = 1.0  # once idle while draining, wait this long for late ACKs and retransmissions
SPAN_FLUSH = 5.0  # seconds given to the span pipeline at shutdown (1 s after a second signal)


def new_event_loop(log: JsonLog) -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: falling back to the asyncio event loop (slower)",
                    "uvloop_missing")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def make_span_pipeline(settings: ProxySettings, stats: Stats, log: JsonLog, call_id_mask=None):
    """The OTLP span pipeline, or None when tracing is off or unavailable."""
    if not settings.tracing:
        return None
    try:
        from .tracing import SpanPipeline
    except ImportError:
        return None
    kw = {}
    params = inspect.signature(SpanPipeline.for_proxy).parameters
    if "call_id_mask" in params:
        kw["call_id_mask"] = call_id_mask
    if "log" in params:
        kw["log"] = log
    return SpanPipeline.for_proxy(settings, stats, **kw)


class ProxyApp:
    def __init__(self, settings: ProxySettings, log: JsonLog | None = None):
        self.settings = settings
        self.clock = epoch_clock()
        self.stats = Stats()
        secret = getattr(settings, "secret", b"")
        self.call_id_mask = CallIdMasker(getattr(settings, "mask_call_id", "digits"), secret)
        self.log = log or JsonLog(settings.service_name, mask_mode=settings.mask_numbers,
                                  level=settings.log_level)
        self.log.call_id_mask = self.call_id_mask
        self.errors = ErrorReporter(self.log, self.stats.internal_errors)
        self.log.on_error = self.errors.report
        ratio = settings.sample_ratio if settings.sample_ratio is not None else 1.0
        self.spans = make_span_pipeline(settings, self.stats, self.log, self.call_id_mask)
        # the span worker process writes the call summaries (their fields, masking and JSON off
        # the loop); the proxy's own lines then go out in writes a pipe keeps whole
        self._worker_summaries = bool(getattr(self.spans, "summaries", False))
        self._spans_flushed = True  # the span pipeline's shutdown finished within the stop's wait
        if self._worker_summaries:
            self.log.atomic_lines = interleaves(self.log.stream)
        self._worker_log_errors = 0  # the worker's summaries that failed, counted so far
        parent_based = True  # (--sample-ratio: a ratio for new traces, the caller's flag for joined ones)
        if self.spans is not None and settings.sample_ratio is None:
            ratio = getattr(self.spans, "sample_ratio", ratio)
            parent_based = getattr(self.spans, "parent_based", True)
        self.core = ProxyCore(CoreConfig(
            advertise=settings.advertise, upstream=settings.upstream,
            record_route=settings.record_route, trace_header=settings.trace_header,
            correlation_headers=getattr(settings, "correlation_headers", "X-CID,Session-ID"),
            sample_ratio=ratio, parent_based=parent_based, timer_b=settings.timer_b,
            timer_c=getattr(settings, "timer_c", 180.0), secret=secret,
            allow_next_hop=tuple(getattr(settings, "allow_next_hop", ())),
            max_transactions=settings.max_transactions, max_calls=settings.max_calls,
            max_call_duration=settings.max_call_duration,
            upstream_transport=getattr(settings, "upstream_transport", "udp")), self.stats)
        self.core.tracker.expire_budget = EXPIRE_STEP  # the timers in steps (see _handle_timers)
        self.metrics = Metrics(self.stats, self.clock, on_error=self.errors.report)
        self._stop = asyncio.Event()
        self._servers: list = []
        self.edge = UdpEdge(self.core, self.clock)
        self.edge.overload_window = max(1, round(settings.overload_after / OVERLOAD_SAMPLE))
        self.edge.ticked_sampling = True  # the tick samples the quiet queue (transport.QUIET_SHARE)
        self.tcp: TcpEdge | None = None
        if getattr(settings, "tcp", False):
            self.tcp = TcpEdge(self.core, self.clock, self.edge.send,
                               max_connections=settings.tcp_max_connections,
                               idle_timeout=settings.tcp_idle_timeout,
                               overload_after=settings.overload_after)
            self.edge.tcp = self.tcp
            edge = self.edge
            self.tcp.udp_overloaded = lambda: edge.guard is not None and edge.guard.overloaded
            self.metrics.gateway.register(self.tcp.tcp_stats)
        self.hep = sender_for_proxy(settings)  # HEP copies of every message, or None
        if self.hep is not None:
            self.edge.wiretap = self.hep.tap
            if self.tcp is not None:
                self.tcp.wiretap = self.hep.tap
            self.metrics.gateway.register(self.hep)
        self.gc = GcPolicy(on_deep=self._gc_deep, state_size=self._state_size)
        self._send_errors_logged = 0
        # drain state
        self.draining = False
        self._drain_started = 0.0
        self._drain_deadline = 0.0
        self._idle_since: float | None = None
        self._last_record = float("-inf")  # when the tick last drained finished records
        self._backlog: deque = deque()  # finished records not handled yet (see tick)
        self._slice_pending = False
        self._timers_pending = False
        self._ticks = 0
        self._alive_file = ""  # (set at start from --alive-file)
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stop_reason = "signal"
        self._hard_stop = False
        self._hard = asyncio.Event()  # a second signal: stop waiting for anything
        # span pipeline failures seen so far (its thread counts, the tick publishes)
        self._span_failures_seen = 0
        self._spans_file_failing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        host, port = self.settings.listen
        await self.edge.open(self.settings.listen)
        if self.tcp is not None:
            await self.tcp.open(self.settings.listen)
            wanted = self.settings.tcp_max_connections
            if self.tcp.max_connections < wanted:
                self.log.warning("too few file descriptors for --tcp-max-connections: the cap is lowered "
                                 "to fit (raise the container's nofile limit)", "tcp_max_connections_lowered",
                                 wanted=wanted, cap=self.tcp.max_connections)
        for reg, addr in ((self.metrics.gateway, self.settings.gateway_metrics),
                          (self.metrics.signaling, self.settings.signaling_metrics)):
            if addr is not None:
                self._servers.append(await serve_metrics(reg, addr[0], addr[1],
                                                         on_error=self.errors.report,
                                                         ready=lambda: not self.draining))
        s = self.settings
        self.log.info("sipwatch proxy started", "started",
                      listen=f"{host}:{port}", upstream=f"{s.upstream[0]}:{s.upstream[1]}",
                      transports="udp,tcp" if self.tcp is not None else "udp",
                      upstream_transport=getattr(s, "upstream_transport", "udp"),
                      advertise=f"{s.advertise[0]}:{s.advertise[1]}",
                      gateway_metrics=_fmt(s.gateway_metrics), signaling_metrics=_fmt(s.signaling_metrics),
                      record_route=s.record_route, trace_header=s.trace_header,
                      correlation_headers=getattr(s, "correlation_headers", None),
                      tracing=self.spans is not None, event_loop=type(loop).__module__.split(".")[0],
                      upstream_socket="connected" if self.edge.upstream_tx else "shared",
                      drain_timeout=getattr(s, "drain_timeout", 25.0),
                      timer_c=getattr(s, "timer_c", 180.0),
                      allow_next_hop=[str(n) for n in getattr(s, "allow_next_hop", ())],
                      mask_call_id=self.call_id_mask.mode,
                      secret="set" if getattr(s, "secret", b"") else "random",
                      heap="huge pages" if heap.active() else "plain",
                      hep_endpoint=None if self.hep is None
                      else f"{self.hep.transport}:{self.hep.collector[0]}:{self.hep.collector[1]}")
        self.gc.start()
        self._alive_file = getattr(s, "alive_file", "") or ""
        if self._alive_file:
            try:
                with open(self._alive_file, "a"):
                    pass
            except OSError as exc:  # (the probe then fails: the deployment is told at once)
                self.log.warning(f"--alive-file {self._alive_file!r} cannot be written: {exc}; "
                                 "not kept", "alive_file_failed")
                self._alive_file = ""
        if not getattr(s, "secret", b""):
            self.log.warning(
                "no --secret/SIPWATCH_SECRET: using a random key for this process; after a restart, "
                "in-dialog requests of calls set up before it only pass toward gateways seen again "
                "or allowed by --allow-next-hop, and Call-ID hashes change", "secret_missing")

    # -- housekeeping ----------------------------------------------------------------------
    def tick(self, everything: bool = False) -> None:
        """Housekeeping: timers, finished records → histograms, logs, spans. Never raises.

        The records are handled in slices of at most CALLS_PER_SLICE calls, each in a callback
        of its own after this one, so the loop reads its sockets in between (a whole tick's
        records at 1000 calls/s held datagrams for 1.4 ms; the tick's own first slice still made
        it the longest callback, p99 1-1.8 ms, and the one most of the slowest round trips
        overlapped). ``everything``: all of them now (shutdown)."""
        report = self.errors.report
        core = self.core
        if not everything:
            self.edge.sample_tick()
        self.log.deferred = True  # this tick's lines go out in one write, below
        self._handle_timers(everything)
        try:
            records = core.drain_finished() if everything or len(self._backlog) < MAX_BACKLOG else []
        except Exception as exc:  # noqa: BLE001
            report("tick", exc)
            records = []
        if records:
            self._last_record = self.clock()
            self._backlog.extend(records)
        if everything:
            self._records_slice(everything)
        try:  # the collector's step, then the records: each in a callback of its own
            self._after_poll(self._gc_step)
        except RuntimeError:  # no running loop: here
            self._gc_step()
        if self.hep is not None:
            try:
                self.hep.flush()
            except Exception as exc:  # noqa: BLE001
                report("send", exc)
        if self._worker_summaries:
            self._lost_summaries()
        if everything or self._ticks % HEALTH_EVERY == 0:
            self.errors.catch_up(self.stats.internal_error_text)  # failures counted in callbacks
        self.log.deferred = False
        try:
            self.log.flush()  # the tick's lines in one write
        except Exception as exc:  # noqa: BLE001
            report("log", exc)
        self.stats.log_lines_dropped = self.log.dropped_lines + getattr(self.spans, "log_dropped", 0)
        try:
            if self._ticks % HEALTH_EVERY == 0:
                self._span_health()
            errors = self.stats.send_errors
            if errors != self._send_errors_logged:
                self.log.warning("datagrams could not be sent", "send_errors",
                                 total=errors, new=errors - self._send_errors_logged,
                                 last_error=masked_error_text(self.edge.last_error or "", self.log.mask_mode))
                self._send_errors_logged = errors
        except Exception as exc:  # noqa: BLE001
            report("tick", exc)

    def _records_slice(self, everything: bool = False) -> None:
        """Finished records from the backlog: the call summary (written here, or handed to the
        span worker as a tuple to write), its HEP LOG copy, the histograms (once for the slice's
        calls), then the hand-off to the span pipeline; at most CALLS_PER_SLICE calls unless
        ``everything``, the rest in a later callback of the loop."""
        report = self.errors.report
        backlog = self._backlog
        if not backlog:
            return
        chunk, calls = take_slice(backlog, everything, CALLS_PER_SLICE, RECORDS_PER_SLICE, report)
        if self._worker_summaries:
            try:
                self.spans.submit_summaries(summary_tuples(calls, self._summary_failed))
            except Exception as exc:  # noqa: BLE001
                report("log", exc)
        else:
            summarize_all(calls, self.log.call_summary, self._summary_failed)
        if self.hep is not None and self.settings.hep_log:
            hep = self.hep
            for obj in calls:
                try:
                    hep.call_summary(obj.call_id, summary_record(
                        obj, self.settings.mask_numbers, self.call_id_mask), self.clock())
                except Exception as exc:  # noqa: BLE001
                    report("log", exc)
        if self.spans is not None:  # (takes what it needs now: before the transactions go)
            try:
                self.spans.submit(chunk)
            except Exception as exc:  # noqa: BLE001
                report("spans", exc)
        try:
            forget_events(chunk)  # the span record was their last reader
        except Exception as exc:  # noqa: BLE001
            report("tick", exc)
        if calls:
            try:
                self.metrics.observe_calls(calls, report)
            except Exception as exc:  # noqa: BLE001
                report("metrics", exc)
            let_go_all(calls, report)  # the summary and the span record were the last readers
        self._slices_soon()

    def _slices_soon(self) -> None:
        """The backlog's next slice in the loop's next callback (finished here, all of it,
        without a running loop)."""
        if self._backlog and not self._slice_pending:
            try:
                asyncio.get_running_loop().call_soon(self._next_slice)
                self._slice_pending = True
            except RuntimeError:  # no running loop (shutdown): finish here
                self._records_slice(everything=True)

    def _handle_timers(self, everything: bool = False) -> None:
        """The timers' due entries, at most EXPIRE_STEP of them in this callback (all of them if
        ``everything``); what is left goes on in a callback of its own, until none is due."""
        tracker = self.core.tracker
        try:
            self.core.handle_timers(self.clock())
            while everything and tracker.expire_left:
                self.core.handle_timers(self.clock())
        except Exception as exc:  # noqa: BLE001 - a callback of the loop must not raise
            self.errors.report("tick", exc)
            return
        if tracker.expire_left and not self._timers_pending:
            try:
                self._after_poll(self._timers_step)
                self._timers_pending = True
            except RuntimeError:  # no running loop (shutdown): all of them here
                self._handle_timers(everything=True)

    @staticmethod
    def _after_poll(fn) -> None:
        """``fn`` in a callback of its own once the loop has polled its sockets again. A callback
        scheduled from a timer's callback (the tick) runs in the same iteration, before the poll,
        under uvloop and asyncio alike: it would only lengthen the tick's stop. One scheduled from
        a plain callback runs after the poll. Raises RuntimeError without a running loop."""
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, fn)

    @staticmethod
    def _soon(fn) -> None:
        """``fn`` in the loop's next callback (after a poll, when called from a plain callback),
        or here without a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            fn()
            return
        loop.call_soon(fn)

    def _timers_step(self) -> None:
        self._timers_pending = False
        self._handle_timers()

    def _gc_step(self) -> None:
        """The collector's step (gcpolicy), after the tick. Its young collection costs ~6 µs per
        call carried (live, 1000 calls/s, every feature on), about what the timers cost: at 4000
        calls/s ~0.5 ms a tick, which no longer adds to the stop of the tick's own callback.
        Then the first slice of the records, in the next callback."""
        log = self.log
        deferred = log.deferred
        log.deferred = True  # a line of it (a deep collection's) goes out with the next write
        try:
            self.gc.tick()
        except Exception as exc:  # noqa: BLE001 - a callback of the loop must not raise
            self.errors.report("tick", exc)
        log.deferred = deferred
        self._slices_soon()

    def _next_slice(self) -> None:
        """A slice of the backlog. The lines of the slices are held until the last one of them
        writes them all in one write (an undeferred line in between takes them along, in order)."""
        self._slice_pending = False
        self.log.deferred = True
        try:
            self._records_slice()
        except Exception as exc:  # noqa: BLE001 - a callback of the loop must not raise
            self.errors.report("tick", exc)
        self.log.deferred = False
        if not self._slice_pending:
            try:
                self.log.flush()
            except Exception as exc:  # noqa: BLE001
                self.errors.report("log", exc)

    def _summary_failed(self, call, exc: Exception) -> None:
        """A call summary that could not be written: counted, and the minimal line instead
        (the call still gets its one summary line, so counts from logs stay right)."""
        self.log.minimal_summary(call, exc)

    def _lost_summaries(self) -> None:
        """The summaries the span worker will not write (it died, or stayed too far behind),
        written here; and the worker's failed summaries counted."""
        sp = self.spans
        try:
            self.log.summaries_of(sp.take_lost_summaries())
            failed = sp.log_errors
            if failed != self._worker_log_errors:
                self.stats.internal_errors["log"] += failed - self._worker_log_errors
                self.stats.internal_error_text["log"] = f"the span worker failed to write {failed} call summaries in all"
                self._worker_log_errors = failed
        except Exception as exc:  # noqa: BLE001
            self.errors.report("log", exc)

    def _state_size(self) -> int:
        """Calls and transactions in the tables: the live state whose growth explains the
        resident size's (see gcpolicy)."""
        tracker = self.core.tracker
        return len(tracker.calls) + len(tracker.transactions)

    def _gc_deep(self, seconds: float, collected: int, rss_before: int, rss_after: int) -> None:
        self.stats.gc_deep += 1
        self.stats.gc_deep_seconds += seconds
        self.log.info("deep garbage collection (resident size grew)", "gc_deep",
                      duration_ms=round(seconds * 1000, 1), collected=collected,
                      rss_before_mb=round(rss_before / 2**20, 1), rss_after_mb=round(rss_after / 2**20, 1))

    def _span_health(self) -> None:
        """Publish the span thread's failures and log a failing spans file once (and its recovery)."""
        sp = self.spans
        if sp is None:
            return
        failures = getattr(sp, "failures", 0)
        if failures != self._span_failures_seen:
            self.stats.internal_errors["spans"] += failures - self._span_failures_seen
            self.stats.internal_error_text["spans"] = f"the span pipeline failed {failures} times in all"
            self._span_failures_seen = failures
        failing = getattr(sp, "file_failing", False)
        if failing and not self._spans_file_failing:
            self.log.error("spans file cannot be written: spans are dropped until it can",
                           "spans_file_failed", path=self.settings.spans_file,
                           error=getattr(sp, "file_error", None),
                           failed_writes=getattr(sp, "file_failures", 0))
        elif self._spans_file_failing and not failing:
            self.log.info("spans file writable again", "spans_file_recovered",
                          path=self.settings.spans_file,
                          failed_writes=getattr(sp, "file_failures", 0))
        self._spans_file_failing = failing

    def _loop_exception(self, loop, context) -> None:
        """Anything that escaped a callback (a datagram handler, a connection task): count it,
        log it rate-limited, no traceback on stderr."""
        try:
            exc = context.get("exception") or RuntimeError(str(context.get("message", "unknown")))
            component = "datagram" if ("protocol" in context or "transport" in context
                                       or _raised_in(exc, ("datagram_received", "error_received"))) \
                else "tick"
            self.errors.report(component, exc)
        except Exception:  # noqa: BLE001
            pass

    # -- signals and drain -----------------------------------------------------------------
    def _on_stop_signal(self, signame: str) -> None:
        try:
            if self.draining or self._stop.is_set():
                self._hard_stop = True
                self._hard.set()
                self._stop_reason = f"second {signame}"
                self.log.warning(f"{signame} while draining: stopping now", "drain_aborted",
                                 active_calls=self.stats.active_calls)
                self._stop.set()
                return
            self.start_drain(signame)
        except Exception as exc:  # noqa: BLE001
            self.errors.report("tick", exc)
            self._stop.set()

    def start_drain(self, reason: str = "SIGTERM") -> None:
        now = self.clock()
        timeout = float(getattr(self.settings, "drain_timeout", 25.0))
        self.draining = True
        self.core.draining = True
        self._drain_started = now
        self._drain_deadline = now + timeout
        self._idle_since = None
        self.log.info("draining: new dialogs get 503, calls in progress keep going", "drain_started",
                      signal=reason, timeout_s=timeout, active_calls=self.stats.active_calls,
                      pending_invites=self._pending_invites())
        if timeout <= 0:
            self._stop_reason = "drain_timeout"
            self._stop.set()

    def _pending_invites(self) -> int:
        try:
            return sum(1 for tx in self.core.tracker.transactions.values()
                       if tx.t_final is None and tx.midx == INVITE)
        except Exception as exc:  # noqa: BLE001
            self.errors.report("tick", exc)
            return 0

    def _drain_check(self) -> None:
        now = self.clock()
        if now >= self._drain_deadline:
            self._stop_reason = "drain_timeout"
            self._stop.set()
            return
        if self.stats.active_calls <= 0 and self._pending_invites() == 0:
            if self._idle_since is None:
                self._idle_since = now
            # linger for late ACKs and retransmissions only if something ended lately
            if now - self._last_record >= DRAIN_LINGER:
                self._stop_reason = "drained"
                self._stop.set()
        else:
            self._idle_since = None

    def _on_hup(self) -> None:
        try:
            reopened = False
            if self.spans is not None and hasattr(self.spans, "reopen"):
                reopened = self.spans.reopen()
            self.log.info("SIGHUP: nothing to reload" + ("; spans file re-opened" if reopened else ""),
                          "sighup", spans_file_reopened=reopened)
        except Exception as exc:  # noqa: BLE001
            self.errors.report("tick", exc)

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
        # the tick is a timer callback that schedules its successor: no task, future and
        # timeout built and torn down every 20 ms (what a wait_for loop cost)
        self._tick_handle = loop.call_later(TICK, self._periodic_tick)
        try:
            await self._stop.wait()
        finally:
            if self._tick_handle is not None:
                self._tick_handle.cancel()
        await self.stop()

    def _periodic_tick(self) -> None:
        """Every TICK seconds until the stop: housekeeping, and while draining, every
        DRAIN_CHECK_EVERY ticks, the drain check."""
        try:
            if self._stop.is_set():
                return
            self.tick()
            self._ticks += 1
            if self._alive_file and self._ticks % ALIVE_EVERY == 0:
                try:
                    os.utime(self._alive_file)
                except OSError as exc:
                    self.errors.report("tick", exc)
            if self.draining and not self._stop.is_set() and self._ticks % DRAIN_CHECK_EVERY == 0:
                try:
                    self._drain_check()
                except Exception as exc:  # noqa: BLE001
                    self.errors.report("tick", exc)
                    self._stop.set()
        finally:
            if not self._stop.is_set():
                self._tick_handle = asyncio.get_running_loop().call_later(TICK, self._periodic_tick)

    async def stop(self) -> None:
        self.edge.close()
        if self.tcp is not None:
            self.tcp.close()
        now = self.clock()
        self.tick(everything=True)
        open_calls = 0
        try:
            tracker = self.core.tracker
            open_calls = sum(1 for c in list(tracker.calls.values())
                             if not c.finished and c.is_call)
            if "ended_by" in inspect.signature(tracker.finish_open_calls).parameters:
                tracker.finish_open_calls(now, ended_by="shutdown")
            else:  # an older tracker: mark them, then finish them
                for c in list(tracker.calls.values()):
                    if not c.finished:
                        try:
                            c.ended_by = "shutdown"
                        except AttributeError:
                            pass
                tracker.finish_open_calls(now)
        except Exception as exc:  # noqa: BLE001
            self.errors.report("tick", exc)
        self.tick(everything=True)  # summaries of the calls just ended
        if self.hep is not None:
            self.hep.close()
        if self.draining or self._hard_stop:
            self.log.info("drain finished", "drain_finished", reason=self._stop_reason,
                          duration_s=round(now - self._drain_started, 3),
                          open_calls=open_calls, active_calls=self.stats.active_calls,
                          rejected=self.stats.drain_rejected)
        for srv in self._servers:
            srv.close()
            try:
                await asyncio.wait_for(srv.wait_closed(), 1.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        if self.spans is not None:
            flush = 1.0 if self._hard_stop else SPAN_FLUSH
            try:
                err = await self._flush_spans(flush)
                if err is not None:
                    raise err
            except Exception as exc:  # noqa: BLE001
                self.errors.report("spans", exc)
            self._span_health()
            if self._worker_summaries:
                if not self._spans_flushed:  # its shutdown still runs: what it holds, written here
                    self.spans.give_back_summaries()  # (twice rather than never)
                self._lost_summaries()
        s = self.stats
        hep = {} if self.hep is None else {"hep_sent": self.hep.sent,
                                           "hep_dropped": sum(self.hep.dropped.values())}
        self.log.info("sipwatch proxy stopped", "stopped", calls=sum(s.calls),
                      parse_errors=s.parse_errors, send_errors=s.send_errors,
                      internal_errors=dict(s.internal_errors), **hep)


    async def _flush_spans(self, flush: float):
        """Run the span pipeline's shutdown in a daemon thread; a second signal stops the wait
        (the process then exits without waiting for the thread)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished(result):
            if not done.done():
                done.set_result(result)

        def work():
            try:
                self.spans.shutdown(flush)
                result = None
            except Exception as exc:  # noqa: BLE001
                result = exc
            try:
                loop.call_soon_threadsafe(finished, result)
            except RuntimeError:
                pass  # the loop is gone

        threading.Thread(target=work, name="sipwatch-span-flush", daemon=True).start()
        hard = asyncio.ensure_future(self._hard.wait())
        try:
            await asyncio.wait({done, hard}, timeout=flush + 3.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hard.cancel()
        self._spans_flushed = done.done()
        return done.result() if done.done() else None


def _raised_in(exc: BaseException, names: tuple) -> bool:
    """Whether a frame of ``exc``'s traceback is one of the functions ``names`` (bounded walk)."""
    tb = exc.__traceback__
    for _ in range(64):
        if tb is None:
            return False
        if tb.tb_frame.f_code.co_name in names:
            return True
        tb = tb.tb_next
    return False


def _fmt(addr):
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def run_proxy(settings: ProxySettings) -> int:
    if settings.huge_heap:  # (done already, first thing, from the command line: heap.early_choice)
        heap.use_huge_pages()
    # log lines never block the loop: a stalled reader of stdout costs lines (counted), not calls
    log = JsonLog(settings.service_name, mask_mode=settings.mask_numbers, level=settings.log_level,
                  background=True)
    loop = new_event_loop(log)
    try:
        app = ProxyApp(settings, log)
        loop.run_until_complete(app.run())
    except OSError as exc:
        log.error(f"cannot start: {exc}", "start_failed")
        return 1
    finally:
        loop.close()
        log.close()
    return 0

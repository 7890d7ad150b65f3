"""Wires the proxy together: UDP socket, metrics endpoints, periodic housekeeping, shutdown.

The housekeeping tick (every 200 ms, off the per-datagram path) expires transactions, drains
finished calls and transactions into the call histograms, the JSON log and the span pipeline.
"""
from __future__ import annotations

import asyncio
import signal

from .config import ProxySettings
from .core import CoreConfig, ProxyCore
from .logs import JsonLog
from .metrics import Metrics, serve_metrics
from .stats import Stats
from .transport import UdpEdge, epoch_clock

TICK = 0.2


def new_event_loop(log: JsonLog) -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: falling back to the asyncio event loop (slower)",
                    "uvloop_missing")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def make_span_pipeline(settings: ProxySettings, stats: Stats, log: JsonLog):
    """The OTLP span pipeline, or None when tracing is off or unavailable."""
    if not settings.tracing:
        return None
    try:
        from .tracing import SpanPipeline
    except ImportError:
        return None
    return SpanPipeline.for_proxy(settings, stats)


class ProxyApp:
    def __init__(self, settings: ProxySettings, log: JsonLog | None = None):
        self.settings = settings
        self.log = log or JsonLog(settings.service_name, mask_mode=settings.mask_numbers,
                                  level=settings.log_level)
        self.clock = epoch_clock()
        self.stats = Stats()
        ratio = settings.sample_ratio if settings.sample_ratio is not None else 1.0
        self.spans = make_span_pipeline(settings, self.stats, self.log)
        if self.spans is not None and settings.sample_ratio is None:
            ratio = getattr(self.spans, "sample_ratio", ratio)
        self.core = ProxyCore(CoreConfig(
            advertise=settings.advertise, upstream=settings.upstream,
            record_route=settings.record_route, trace_header=settings.trace_header,
            sample_ratio=ratio, timer_b=settings.timer_b,
            max_transactions=settings.max_transactions, max_calls=settings.max_calls,
            max_call_duration=settings.max_call_duration), self.stats)
        self.metrics = Metrics(self.stats, self.clock)
        self._stop = asyncio.Event()
        self._servers: list = []
        self.edge = UdpEdge(self.core, self.clock)
        self._send_errors_logged = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.listen
        await self.edge.open(self.settings.listen)
        for reg, addr in ((self.metrics.gateway, self.settings.gateway_metrics),
                          (self.metrics.signaling, self.settings.signaling_metrics)):
            if addr is not None:
                self._servers.append(await serve_metrics(reg, addr[0], addr[1]))
        s = self.settings
        self.log.info("sipwatch proxy started", "started",
                      listen=f"{host}:{port}", upstream=f"{s.upstream[0]}:{s.upstream[1]}",
                      advertise=f"{s.advertise[0]}:{s.advertise[1]}",
                      gateway_metrics=_fmt(s.gateway_metrics), signaling_metrics=_fmt(s.signaling_metrics),
                      record_route=s.record_route, trace_header=s.trace_header,
                      tracing=self.spans is not None, event_loop=type(loop).__module__.split(".")[0],
                      upstream_socket="connected" if self.edge.upstream_tx else "shared")

    def tick(self) -> None:
        """Housekeeping: timers, finished records → histograms, logs, spans."""
        core = self.core
        core.handle_timers(self.clock())
        records = core.drain_finished()
        if records:
            for kind, obj in records:
                if kind == "call" and obj.is_call:
                    self.metrics.observe_call(obj)
                    self.log.call_summary(obj)
            if self.spans is not None:
                self.spans.submit(records)
        errors = self.stats.send_errors
        if errors != self._send_errors_logged:
            self.log.warning("datagrams could not be sent", "send_errors",
                             total=errors, new=errors - self._send_errors_logged,
                             last_error=self.edge.last_error)
            self._send_errors_logged = errors

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), TICK)
            except asyncio.TimeoutError:
                pass
            self.tick()
        await self.stop()

    async def stop(self) -> None:
        self.edge.close()
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        self.tick()
        if self.spans is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.spans.shutdown, 5.0)
        s = self.stats
        self.log.info("sipwatch proxy stopped", "stopped", calls=sum(s.calls),
                      parse_errors=s.parse_errors, send_errors=s.send_errors)


def _fmt(addr):
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def run_proxy(settings: ProxySettings) -> int:
    log = JsonLog(settings.service_name, mask_mode=settings.mask_numbers, level=settings.log_level)
    loop = new_event_loop(log)
    try:
        app = ProxyApp(settings, log)
        loop.run_until_complete(app.run())
    except OSError as exc:
        log.error(f"cannot start: {exc}", "start_failed")
        return 1
    finally:
        loop.close()
    return 0

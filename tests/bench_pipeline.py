"""The whole proxy in process: a SIPp-like call stream through ``ProxyApp`` with every feature on,
in simulated time, with no sockets and no event loop.

What it adds to the micro-benchmark: everything the event loop does for a call besides the
datagrams (the housekeeping ticks every 20 ms: timers, call summaries, span hand-off, histograms,
the collector's steps) and the state a long run piles up. Finished calls linger ``timer_b`` (32 s)
before they are freed, so a run of a few seconds never pays for freeing them and works on small
tables: here the simulated clock runs past the linger, and only the part after ``warm`` seconds is
counted. Without sockets, what is left is the process's own CPU; without real time, no wake-ups.

The calls follow SIPp's flow in ``bench_micro`` (INVITE, 100, 180, 200, ACK, BYE, 200), spaced a
few milliseconds apart as on the loopback, at ``rate`` calls a second. The loop's own work
(building the messages, the event heap) is measured in a second pass with the proxy left out and
taken off the figure. (It was the process's CPU less the building alone, timed with
``process_time`` around each message: a system call of ~1.2 µs on this VM, part of which stayed in
the figure with the heap's ~0.7 µs; in alternating runs the two ways agreed within the noise.)
The span worker process is started as the proxy starts it; its
CPU is not in the figure (a process of its own), its hand-off is.
"""
from __future__ import annotations

import gc
import heapq
import os
import shutil
import tempfile
import time

import bench_micro as bm
from bench_net import rss_peak_mb

# what follows each message of a call, and after how long (seconds), as SIPp on the loopback
_NEXT = (0.0005, 0.0005, 0.001, 0.0005, 0.002, 0.0005, None)
TICK = 0.02  # the proxy's housekeeping tick (app.TICK)


def _echo(msg: bytes, src, t: float) -> list:
    return [(msg, src)]


def _nothing() -> None:
    pass


def _drive(receive, tick, clock: list, rate: float, seconds: float, warm: float) -> tuple[int, int, float]:
    """SIPp's call flow at ``rate`` calls/s for ``seconds`` through ``receive``, ``tick`` every
    TICK of simulated time: (messages, messages counted after ``warm`` s, ``process_time()`` when
    counting began)."""
    gw, up = bm.GATEWAY, bm.UPSTREAM
    start = clock[0]
    n_calls = int(rate * seconds)
    heap = [(start + i / rate, 0, i) for i in range(n_calls)]  # (when, step of the call, call)
    heapq.heapify(heap)
    fwd_inv: dict[int, bytes] = {}
    fwd_bye: dict[int, bytes] = {}
    msgs = counted = 0
    next_tick = start + TICK
    t_warm = start + warm
    cpu0 = None
    while heap:
        t, step, i = heapq.heappop(heap)
        while next_tick <= t:
            clock[0] = next_tick
            tick()
            next_tick += TICK
        clock[0] = t
        if cpu0 is None and t >= t_warm:
            cpu0, counted = time.process_time(), 0
        n = i + 1
        if step == 0:
            msg, src = bm.invite(n), gw
        elif step in (1, 2, 3):
            msg = bm.response(fwd_inv[i], (b"100 Trying", b"180 Ringing", b"200 OK")[step - 1], n, step == 3)
            src = up
        elif step in (4, 5):
            msg, src = bm.in_dialog((b"ACK", b"BYE")[step - 4], step - 3, n), gw
        else:
            msg, src = bm.response(fwd_bye.pop(i), b"200 OK", n), up
        out = receive(msg, src, t)
        if not out:
            raise RuntimeError(f"message {step} of call {n} was not forwarded")
        if step == 0:
            fwd_inv[i] = out[0][0]
        elif step == 3:
            del fwd_inv[i]
        elif step == 5:
            fwd_bye[i] = out[0][0]
        msgs += 1
        counted += 1
        if _NEXT[step] is not None:
            heapq.heappush(heap, (t + _NEXT[step], step + 1, i))
    clock[0] = next_tick
    return msgs, counted, cpu0 if cpu0 is not None else time.process_time()


def run(rate: float = 1000.0, seconds: float = 45.0, warm: float = 35.0, extra: tuple[str, ...] = ()) -> dict:
    """The proxy's CPU per message (the process's, less the loop's own work measured in a second
    pass) of the calls placed after ``warm`` simulated seconds, what the proxy counted, and the peak resident size of the proxy
    process and of its span worker. ``extra``: more command-line settings (state caps, say)."""
    from sipwatch.app import ProxyApp
    from sipwatch.config import settings_from
    from sipwatch.logs import JsonLog

    workdir = tempfile.mkdtemp(prefix="sipwatch-pipeline-")
    settings = settings_from([
        "--listen", "127.0.0.1:5070", "--upstream", "127.0.0.1:5080",
        "--otlp-endpoint", "http://127.0.0.1:9/v1/traces", "--otlp-protocol", "http/protobuf",
        "--sample-ratio", "1", "--spans-file", os.path.join(workdir, "spans.jsonl"),
        "--gateway-metrics", "off", "--signaling-metrics", "off", "--no-tcp", *extra], env={})
    sink = open(os.devnull, "wb")
    log = JsonLog(settings.service_name, mask_mode=settings.mask_numbers, level=settings.log_level, stream=sink)
    app = ProxyApp(settings, log)
    clock = [1_000_000.0]
    app.clock = lambda: clock[0]
    gc_was = gc.isenabled()
    app.gc.start()  # (as the running proxy: the automatic collector off, its steps in the ticks)
    try:
        msgs, counted, cpu0 = _drive(app.core.receive_datagram, app.tick, clock, rate, seconds, warm)
        for _ in range(10):  # the last summaries (the clock is at the next tick)
            app.tick()
            clock[0] += TICK
        cpu = time.process_time() - cpu0
        # the same loop once more with the proxy left out (each message "forwarded" as it came, the
        # ticks doing nothing): the loop's own work (building the messages, the event heap), off
        # the figure
        _, _, loop0 = _drive(_echo, _nothing, [clock[0]], rate, seconds, warm)
        loop = time.process_time() - loop0
        stats = app.stats
        out = {"rate": rate, "seconds": seconds, "warm": warm, "messages": msgs, "counted": counted,
               "cpu_us_per_msg": (cpu - loop) / counted * 1e6 if counted else None,
               # the process's CPU over the counted span, the loop's own work included, and that
               # work alone (the second pass)
               "process_us_per_msg": cpu / counted * 1e6 if counted else None,
               "loop_us_per_msg": loop / counted * 1e6 if counted else None,
               "calls_finished": sum(stats.calls), "internal_errors": sum(stats.internal_errors.values()),
               "calls_in_tables": len(app.core.tracker.calls),
               "transactions_in_tables": len(app.core.tracker.transactions),
               # (VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's size at the fork)
               "max_rss_mb": rss_peak_mb([os.getpid()]),
               "worker_rss_mb": rss_peak_mb([app.spans.proc.pid] if hasattr(app.spans, "proc") else [])}
    finally:
        app.gc.stop()
        if gc_was:
            gc.enable()
        if app.spans is not None:
            app.spans.shutdown(1.0)
        sink.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


if __name__ == "__main__":
    import json
    import sys
    args = [float(x) for x in sys.argv[1:4]]
    print(json.dumps(run(*args, extra=tuple(sys.argv[4:]))))

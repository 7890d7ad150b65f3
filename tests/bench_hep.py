"""What sending HEP costs the proxy: CPU per forwarded message at a fixed call rate, sidecar
``--no-tracing`` with and without ``--hep-endpoint`` (SIPp caller -> sidecar -> SIPp callee).

    python -m tests.bench_hep [--rate 1000] [--duration 10] [--rounds 2] [--transport udp|tcp]

The collector is a socket of this process: over UDP one it binds and never reads (the kernel
takes every packet and drops it once the buffer is full), over TCP a thread that reads and
discards. What is measured is the sidecar's side alone: the hot-path tap, the encoding and the
``send`` calls in the housekeeping tick (one per packet over UDP, one per batch over TCP). Runs alternate
(without, with, without, with, ...) so load from other processes falls on both alike; the last
line printed is the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_net  # noqa: E402
from harness import free_port, metric, scrape  # noqa: E402


def _tcp_sink() -> socket.socket:
    """A listening socket whose connections are read and discarded by a daemon thread."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)

    def drain(conn):
        with conn:
            while conn.recv(1 << 20):
                pass

    def accept():
        while True:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return lst


def measure(workdir: Path, rate: int = 1000, duration: float = 10.0, rounds: int = 2,
            transport: str = "udp") -> dict:
    """Median CPU µs per message and CPU % without and with HEP, and the HEP sent/dropped counts."""
    if transport == "tcp":
        sink = _tcp_sink()
    else:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
    hep_port = sink.getsockname()[1]
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    hep_counts = []
    try:
        for i in range(rounds):
            for mode in ("without", "with"):
                uas_port = free_port()
                extra = ["--no-tracing"]
                if mode == "with":
                    extra += ["--hep-endpoint", f"{transport}:127.0.0.1:{hep_port}", "--hep-capture-id", "1"]
                target = bench_net.SidecarTarget(workdir, uas_port, *extra, name=f"sipwatch-hep-{mode}")
                with target:
                    r = bench_net.sipp_load(workdir, target, uas_port, rate, duration)
                    if mode == "with":
                        gw = scrape(target.sidecar.gw_metrics)
                        hep_counts.append({"sent": metric(gw, "sipwatch_hep_sent_total"),
                                           "dropped": metric(gw, "sipwatch_hep_dropped_total"),
                                           "flush_cpu_s": metric(gw, "sipwatch_hep_cpu_seconds_total")})
                runs[mode].append(r)
                print(f"  {mode:7s} HEP, round {i + 1}: {r['cpu_pct']:.1f}% CPU, "
                      f"{r['cpu_us_per_msg']:.1f} µs/msg, {r['completed']}/{r['calls']} calls",
                      file=sys.stderr, flush=True)
    finally:
        sink.close()

    def med(mode, key):
        vals = sorted(r[key] for r in runs[mode] if r[key] is not None)
        if not vals:
            return None
        mid = len(vals) // 2
        return round(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2, 2)

    out = {"rate": rate, "duration_s": duration, "rounds": rounds, "transport": transport,
           "cpu_pct_without": med("without", "cpu_pct"), "cpu_pct_with": med("with", "cpu_pct"),
           "us_per_msg_without": med("without", "cpu_us_per_msg"),
           "us_per_msg_with": med("with", "cpu_us_per_msg"),
           "calls_failed": sum(r["failed"] for rs in runs.values() for r in rs),
           "hep": hep_counts}
    # the sidecar's own account of its HEP work (not blurred by other processes' load), plus the
    # two appends per forwarded message on the hot path (measured in process, below)
    flush_us = sorted(1e6 * h["flush_cpu_s"] / h["sent"] for h in hep_counts if h["sent"])
    if flush_us:
        out["flush_us_per_hep_packet"] = round(flush_us[len(flush_us) // 2], 2)
        out["tap_us_per_hep_packet"] = round(tap_cost_us(), 3)
        # one forwarded message = two HEP packets (as received, as sent)
        out["hep_us_per_forwarded_msg"] = round(2 * (out["flush_us_per_hep_packet"]
                                                     + out["tap_us_per_hep_packet"]), 2)
    if out["us_per_msg_with"] is not None and out["us_per_msg_without"] is not None:
        out["hep_us_per_msg"] = round(out["us_per_msg_with"] - out["us_per_msg_without"], 2)
        out["cpu_ratio"] = round(out["cpu_pct_with"] / out["cpu_pct_without"], 3)
    return out


def tap_cost_us(n: int = 200_000) -> float:
    """The hot path's share: one ``HepSender.tap`` call, best of 5 (queue emptied between)."""
    import time

    from sipwatch.hep_sender import HepSender
    s = HepSender(("udp", ("127.0.0.1", 9)), queue_max=n + 1)
    tap, payload, src = s.tap, b"x" * 600, ("127.0.0.1", 5060)
    best = float("inf")
    for _ in range(5):
        s.queue.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            tap(payload, src, None, 0.0)
        best = min(best, (time.perf_counter() - t0) / n)
    s.queue.clear()
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sipwatch-bench-hep-") as d:
        out = measure(Path(d), args.rate, args.duration, args.rounds, args.transport)
    print(f"HEP sender ({out['transport']}) at {out['rate']} calls/s: the sidecar's own account "
          f"{out.get('flush_us_per_hep_packet')} µs per HEP packet in the tick + "
          f"{out.get('tap_us_per_hep_packet')} µs queueing = {out.get('hep_us_per_forwarded_msg')} µs "
          f"per forwarded message; process CPU per forwarded message {out.get('us_per_msg_without')} -> "
          f"{out.get('us_per_msg_with')} µs (x{out.get('cpu_ratio')} CPU, A/B under the machine's load); "
          f"HEP {out['hep']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

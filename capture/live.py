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
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import time

from sipwatch.metrics import Metrics, serve_metrics
from sipwatch.observer import Observer
from sipwatch.logs import JsonLog

from .pcapfile import Decoder

Addr = tuple[str, int]
PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 10**6), b"\x4d\x3c\xb2\xa1": ("<", 10**9),
              b"\xa1\xb2\xc3\xd4": (">", 10**6), b"\xa1\xb2\x3c\x4d": (">", 10**9)}
TICK = 0.2  # seconds between housekeeping runs (expiry, call histograms)


def _addr(s: str) -> Addr:
    host, _, port = s.rpartition(":")
    return (host.strip("[]") or "0.0.0.0", int(port))


class LiveCapture:
    def __init__(self, interface: str, bpf: str, signaling: Addr | None, timer_b: float = 32.0):
        self.interface = interface
        self.bpf = bpf
        self.signaling = signaling
        self.observer = Observer(timer_b=timer_b, signaling=signaling)
        self.metrics = Metrics(self.observer.stats, time.time)
        self.counters: dict = {"frames": 0}
        self.decoder = Decoder(self.counters)
        self.proc: asyncio.subprocess.Process | None = None
        self.header = b""
        self.packets = 0

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
        feed, frame = self.observer.feed, self.decoder.frame
        while True:
            try:
                sec, frac, incl, _ = rec(await out.readexactly(16))
                data = await out.readexactly(incl)
            except asyncio.IncompleteReadError:
                return
            self.counters["frames"] += 1
            for p in frame(linktype, data, (sec * div + frac) / div):
                self.packets += 1
                feed(p.payload, p.src, p.dst, p.ts)

    def housekeeping(self) -> None:
        # capture time is wall time here, so the clock can expire what the packets no longer do
        self.observer.tracker.expire(time.time())
        for kind, obj in self.observer.drain_finished(10_000):
            if kind == "call":
                self.metrics.observe_call(obj)

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _run(args) -> int:
    lc = LiveCapture(args.interface, args.bpf, _addr(args.signaling) if args.signaling else None,
                     args.timer_b)
    servers = []
    for reg, spec in ((lc.metrics.gateway, args.gateway_metrics), (lc.metrics.signaling, args.signaling_metrics)):
        if spec != "off":
            host, port = _addr(spec)
            servers.append(await serve_metrics(reg, host, port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    try:
        await lc.start()
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"sipwatch capture: {exc}\n")
        return 1
    log = JsonLog("sipwatch-capture")
    log.info("capture started", "capturing", interface=args.interface, bpf=args.bpf)
    reader = asyncio.create_task(lc.read())
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
    if not reader.done():
        try:
            await asyncio.wait_for(reader, 2)  # what dumpcap flushed before exiting
        except asyncio.TimeoutError:
            reader.cancel()
    lc.housekeeping()
    for srv in servers:
        srv.close()
    log.info("capture stopped", "stopped", frames=lc.counters["frames"], packets=lc.packets,
             sip=lc.observer.sip_messages)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sipwatch capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--interface", "-i", required=True)
    ap.add_argument("--bpf", default="udp", help="capture filter (default %(default)r)")
    ap.add_argument("--signaling", default=None,
                    help="sip-signaling HOST:PORT: its messages are labelled from_signaling")
    ap.add_argument("--gateway-metrics", default="0.0.0.0:13012", help="HOST:PORT or 'off'")
    ap.add_argument("--signaling-metrics", default="0.0.0.0:13022", help="HOST:PORT or 'off'")
    ap.add_argument("--timer-b", type=float, default=32.0)
    args = ap.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

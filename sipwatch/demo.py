"""``make demo``: real SIP calls through a real sidecar on loopback, then what it measured.

A SIPp caller (the sip-gateway stand-in) places calls through ``sipwatch proxy`` to a SIPp
callee (the sip-signaling stand-in) that answers INVITEs after a set delay. While calls run a
progress line shows what the sidecar's metrics endpoints say; at the end the demo prints the
call counts, RTT percentiles per method, raw Prometheus lines, one JSON call summary and the
text waterfall of the slowest call. Then one call goes through a B2BUA (a SIPp stand-in for
sip-signaling that places the outbound leg back through a sidecar, with ``X-CID``): its waterfall
shows both legs in one trace and the B2BUA's own time between them. Everything runs on 127.0.0.1
and stops when the demo ends.
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _port_candidates():
    """Ports below the kernel's ephemeral range, in order from a random start.

    A port the kernel hands out for bind(0) is also one it may pick as the source of a later
    connect(): a client polling a port nobody listens on yet can then connect to itself (TCP
    simultaneous open) and read back its own request. Outside the ephemeral range that cannot
    happen, and no other socket's bind(0) takes the port between our pick and the server's bind.
    Walking in order means one process never hands out the same port twice in a row."""
    lo, hi = _ephemeral_range()
    first, last = (10000, lo - 1) if lo - 10000 >= 2000 else (hi + 1, 65535)
    span = last - first + 1
    start = random.randrange(span)
    n = 0
    while True:
        yield first + (start + n) % span
        n += 1


_candidates = _port_candidates()


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (SIP is UDP, metrics are TCP),
    outside the ephemeral range (see _port_candidates)."""
    for _ in range(2000):
        port = next(_candidates)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def _came_up(proc, metrics_port: int, timeout: float = 15.0) -> bool:
    """True once the sidecar answers on its metrics port; False if it exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _scrape(metrics_port)
            return True
        except (OSError, http.client.HTTPException):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        return r.read().decode()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs: linear within a bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
        prev_le, prev_c = le, c
    return prev_le


def rtt_by_method(text: str) -> dict[str, dict]:
    fam = _families(text).get("signaler_rtt_milliseconds")
    out: dict[str, dict] = {}
    if fam is None:
        return out
    for s in fam.samples:
        m = s.labels.get("method")
        d = out.setdefault(m, {"buckets": [], "count": 0, "sum": 0.0})
        if s.name.endswith("_bucket"):
            d["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            d["count"] = s.value
        elif s.name.endswith("_sum"):
            d["sum"] = s.value
    for d in out.values():
        d["buckets"].sort()
    return out


def calls_by_outcome(text: str) -> dict[str, float]:
    fam = _families(text).get("sip_calls_processed")
    if fam is None:
        return {}
    return {s.labels["outcome"]: s.value for s in fam.samples if s.name.endswith("_total")}


def calls_ended(text: str) -> float:
    """Answered calls whose BYE was answered (their summaries are written in the same tick)."""
    fam = _families(text).get("sip_call_duration_seconds")
    return sum(s.value for s in fam.samples if s.name.endswith("_count")) if fam else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sipwatch demo", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long to place calls (default 20)")
    p.add_argument("--rate", type=float, default=10.0, help="new calls per second (default 10)")
    p.add_argument("--answer-delay-ms", type=int, default=40, help="callee's delay before answering an INVITE")
    p.add_argument("--hold-ms", type=int, default=2000, help="how long each call stays up before BYE")
    p.add_argument("--b2bua-calls", type=int, default=1,
                   help="calls placed afterwards through a B2BUA, to show both legs in one trace (0: none)")
    p.add_argument("--hep", action="store_true",
                   help="also send every message as HEP to sngrep (Homer's format), to see the ladder there")
    args = p.parse_args(argv)
    if shutil.which("sipp") is None:
        sys.stderr.write("sipwatch demo: SIPp is not installed (Debian/Ubuntu: apt-get install sip-tester)\n")
        return 2

    work = Path(tempfile.mkdtemp(prefix="sipwatch-demo-"))
    sidecar_port, uas_port, uac_port = free_port(), free_port(), free_port()
    gw_metrics, sig_metrics = free_port(), free_port()
    spans_file = work / "spans.jsonl"
    calls = max(1, int(args.seconds * args.rate))
    procs: list[subprocess.Popen] = []

    def start(cmd, name, **kw):
        out = open(work / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=work, **kw)
        procs.append(proc)
        return proc

    hep_args, hep_pcap = [], work / "hep.pcap"
    if args.hep:
        if shutil.which("sngrep") is None:
            sys.stderr.write("sipwatch demo: --hep needs sngrep (Debian/Ubuntu: apt-get install sngrep)\n")
            return 2
        hep_port = free_port()
        hep_args = ["--hep-endpoint", f"udp:127.0.0.1:{hep_port}", "--hep-capture-id", "2001", "--hep-log"]
    print(f"sipwatch demo: {calls} calls at {args.rate:g}/s through the sidecar on 127.0.0.1:{sidecar_port}")
    print(f"  metrics: http://127.0.0.1:{gw_metrics}/metrics (gateway side), "
          f"http://127.0.0.1:{sig_metrics}/metrics (signaling side); files in {work}")
    try:
        env = dict(os.environ)
        if args.hep:
            # sngrep as the HEP collector (as Homer's heplify-server would be), writing a pcap
            sngrep = start(["sngrep", "-N", "-q", "-F", "-L", f"udp:127.0.0.1:{hep_port}", "-O", str(hep_pcap)],
                  "sngrep")
            print(f"  HEP: every message the sidecar receives and sends goes to sngrep on udp:127.0.0.1:{hep_port}")
        sidecar = start([sys.executable, "-m", "sipwatch", "proxy",
                         "--listen", f"127.0.0.1:{sidecar_port}",
                         "--upstream", f"127.0.0.1:{uas_port}",
                         "--gateway-metrics", f"127.0.0.1:{gw_metrics}",
                         "--signaling-metrics", f"127.0.0.1:{sig_metrics}",
                         "--spans-file", str(spans_file),
                         # the demo's calls are over when it stops it: no need to wait 25 s
                         "--drain-timeout", "3", *hep_args], "sidecar", env=env)
        if not _came_up(sidecar, gw_metrics):
            sys.stderr.write((work / "sidecar.log").read_text(errors="replace"))
            sys.stderr.write("sipwatch demo: the sidecar did not start\n")
            return 1
        sipp = ["sipp", "-i", "127.0.0.1", "-nostdin", "-m", str(calls), "-trace_err"]
        start(sipp + ["-sf", str(SCENARIOS / "uas_call.xml"), "-p", str(uas_port),
                      "-d", str(args.answer_delay_ms)], "callee")
        time.sleep(0.3)
        caller = start(sipp + ["-sf", str(SCENARIOS / "uac_call.xml"), "-p", str(uac_port),
                               "-r", f"{args.rate:g}", "-d", str(args.hold_ms),
                               f"127.0.0.1:{sidecar_port}"], "caller")
        limit = time.monotonic() + args.seconds + args.hold_ms / 1000 + 30
        tty = sys.stdout.isatty()
        tick = 0
        while caller.poll() is None and time.monotonic() < limit:
            time.sleep(1)
            tick += 1
            if not tty and tick % 5:
                continue  # a log file gets one progress line every 5 s, a terminal one that updates
            try:
                gw, sig = _scrape(gw_metrics), _scrape(sig_metrics)
            except OSError:
                continue
            done = sum(calls_by_outcome(gw).values())
            inv = rtt_by_method(sig).get("INVITE")
            p50 = quantile(0.5, inv["buckets"]) if inv else None
            active = _families(gw).get("sip_active_calls")
            up = int(active.samples[0].value) if active else 0
            print(f"{chr(13) if tty else ''}  calls counted {int(done):5d}/{calls}  active {up:4d}  "
                  f"INVITE RTT p50 {'-' if p50 is None else f'{p50:6.1f} ms'}",
                  end="" if tty else "\n", flush=True)
        if tty:
            print()
        if caller.poll() is None:
            caller.kill()
        # the last BYE/200 and the housekeeping tick that ends those calls (histogram and call
        # summary in the same tick): wait for it rather than for a fixed time, so a busy machine
        # does not make the report come out short
        settle = time.monotonic() + 10
        while time.monotonic() < settle and calls_ended(_scrape(gw_metrics)) < calls:
            time.sleep(0.1)
        gw, sig = _scrape(gw_metrics), _scrape(sig_metrics)
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(15)
        report(gw, sig, work, spans_file, calls, caller.returncode)
        if args.hep:
            hep_report(sngrep, gw, hep_pcap)
        b2bua_ok = args.b2bua_calls <= 0 or b2bua_demo(work, args.b2bua_calls, start)
        return 0 if caller.returncode == 0 and b2bua_ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def b2bua_demo(work: Path, calls: int, start) -> bool:
    """Calls through a B2BUA: caller -> sidecar -> B2BUA (the sidecar's upstream) -> back through
    the sidecar -> callee, leg B carrying X-CID = leg A's Call-ID. Prints the waterfall and ladder
    of the last one: both legs in one trace. Returns whether every call completed."""
    sidecar_port, b2bua_port, far_port, uac_port = free_port(), free_port(), free_port(), free_port()
    gw_metrics, sig_metrics = free_port(), free_port()
    spans_file = work / "b2bua-spans.jsonl"
    print(f"\n{calls} call(s) through a B2BUA: caller -> sidecar -> B2BUA (sip-signaling stand-in) -> "
          "sidecar -> callee, leg B with X-CID = leg A's Call-ID")
    sidecar = start([sys.executable, "-m", "sipwatch", "proxy", "--listen", f"127.0.0.1:{sidecar_port}",
                     "--upstream", f"127.0.0.1:{b2bua_port}", "--gateway-metrics", f"127.0.0.1:{gw_metrics}",
                     "--signaling-metrics", f"127.0.0.1:{sig_metrics}", "--spans-file", str(spans_file),
                     "--drain-timeout", "3"], "b2bua-sidecar")
    if not _came_up(sidecar, gw_metrics):
        sys.stderr.write("sipwatch demo: the B2BUA sidecar did not start\n")
        return False
    sipp = ["sipp", "-i", "127.0.0.1", "-nostdin", "-m", str(calls), "-trace_err"]
    callee = start(sipp + ["-sf", str(SCENARIOS / "uas_call.xml"), "-p", str(far_port), "-d", "30"], "b2bua-callee")
    b2bua = start(sipp + ["-sf", str(SCENARIOS / "uas_b2bua.xml"), "-p", str(b2bua_port), "-d", "60",
                          "-set", "far_port", str(far_port), "-trace_logs"], "b2bua")
    time.sleep(0.3)
    caller = start(sipp + ["-sf", str(SCENARIOS / "uac_call.xml"), "-p", str(uac_port), "-r", "2", "-d", "500",
                           f"127.0.0.1:{sidecar_port}"], "b2bua-caller")
    ok = True
    for proc in (caller, b2bua, callee):
        try:
            ok = proc.wait(60) == 0 and ok
        except subprocess.TimeoutExpired:
            proc.kill()
            ok = False
    settle = time.monotonic() + 10
    while time.monotonic() < settle and calls_ended(_scrape(gw_metrics)) < 2 * calls:
        time.sleep(0.1)
    sig = _scrape(sig_metrics)
    sidecar.send_signal(signal.SIGTERM)
    sidecar.wait(15)
    for line in sig.splitlines():
        if line.startswith("sip_b2bua_leg_setup_seconds_count") or \
                line.startswith('sip_correlation_total{header="x-cid",result="joined"}'):
            print("  " + line)
    try:
        from .waterfall import render_slowest
    except ImportError:
        return ok
    if spans_file.exists() and spans_file.stat().st_size:
        print("\nwaterfall and ladder of a call through the B2BUA: leg 2 nests under leg 1, the B2BUA's "
              "own time before placing it is the 'B2BUA leg setup' span:")
        print(render_slowest(str(spans_file), ladder=True))
    return ok


def hep_report(sngrep: subprocess.Popen, gw: str, pcap: Path) -> None:
    """Stop sngrep (it writes its pcap on SIGINT) and say where the ladder is."""
    sngrep.send_signal(signal.SIGINT)
    try:
        sngrep.wait(10)
    except subprocess.TimeoutExpired:
        sngrep.kill()
    sent = sum(s.value for f in text_string_to_metric_families(gw) if f.name == "sipwatch_hep_sent"
               for s in f.samples if s.name.endswith("_total"))
    dropped = sum(s.value for f in text_string_to_metric_families(gw) if f.name == "sipwatch_hep_dropped"
                  for s in f.samples if s.name.endswith("_total"))
    print(f"\nHEP: {int(sent)} packets sent to sngrep, {int(dropped)} dropped "
          f"(sipwatch_hep_sent_total, sipwatch_hep_dropped_total)")
    print(f"  the ladder of every call, as sngrep received it:  sngrep -I {pcap}")
    print("  (select a call and press Enter; live, point --hep-endpoint at a running "
          "`sngrep -L udp:0.0.0.0:9060`, or at Homer's heplify-server)")


def report(gw: str, sig: str, work: Path, spans_file: Path, calls: int, caller_rc) -> None:
    outcomes = calls_by_outcome(gw)
    print(f"\ncalls placed by SIPp: {calls} (SIPp exit code {caller_rc}); "
          f"counted by sipwatch: {int(sum(outcomes.values()))} "
          f"({', '.join(f'{k} {int(v)}' for k, v in outcomes.items() if v)})")
    print("\nsignaling RTT (request forwarded -> first response's arrival), from signaler_rtt_milliseconds:")
    print(f"  {'method':8} {'count':>7} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for method, d in sorted(rtt_by_method(sig).items()):
        qs = [quantile(q, d["buckets"]) for q in (0.5, 0.95, 0.99)]
        mean = d["sum"] / d["count"] if d["count"] else 0.0
        print(f"  {method:8} {int(d['count']):7d} {mean:9.2f} " + " ".join(f"{q:8.2f}" for q in qs))
    print("  (percentiles are interpolated within histogram buckets, as PromQL's histogram_quantile does)")
    print("\nas Prometheus scrapes it (excerpt):")
    for line in gw.splitlines():
        if line.startswith("sip_calls_processed_total") and not line.endswith(" 0.0"):
            print("  " + line)
    for line in sig.splitlines():
        if line.startswith('signaler_rtt_milliseconds_count') or \
                line.startswith('signaler_rtt_milliseconds_bucket{le="50.0",method="INVITE"}'):
            print("  " + line)
    summaries = [orjson.loads(ln) for ln in (work / "sidecar.log").read_bytes().splitlines()
                 if ln.startswith(b"{") and b'"call_summary"' in ln]
    if summaries:
        print("\none JSON call summary from the sidecar's log (numbers masked):")
        print("  " + orjson.dumps(summaries[-1]).decode())
    try:
        from .waterfall import render_slowest
    except ImportError:
        return
    if spans_file.exists() and spans_file.stat().st_size:
        print("\nwaterfall and ladder of the call that waited longest on sip-signaling (from the exported spans):")
        print(render_slowest(str(spans_file), ladder=True))
        print(f"\n(any call: sipwatch waterfall {spans_file} --trace TRACE_ID --ladder)")


if __name__ == "__main__":
    sys.exit(main())

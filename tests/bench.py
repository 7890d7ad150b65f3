"""sipwatch benchmark: ``python -m tests.bench [--quick] [--rates 300,1000] [--duration S]
[--only micro,latency,throughput,tracing,flood]`` (``make bench``).

Every figure is set against a baseline measured in the same run on the same machine, because
absolute numbers on a shared 2-core box mean little:

  micro       µs per ``ProxyCore.receive_datagram`` for each message of a call, in process,
              vs ``data.split(b"\\r\\n")`` and a bytes.find of Call-ID/CSeq/branch on the same
              INVITE; the RTT ring write vs a plain list store.
  latency     ping-pong OPTIONS (one request outstanding) to a tiny responder: direct, through a
              bare uvloop UDP relay, through the sidecar (and Kamailio when installed); p50/p99
              round trip and the µs each proxy adds.
  throughput  SIPp caller → proxy → SIPp callee at fixed call rates: calls, failures,
              retransmissions, the proxy's CPU (utime+stime of its process tree), CPU µs per
              forwarded message, UDP drops; sidecar CPU as a multiple of the bare relay's.
  tracing     the sidecar with 100 % sampled spans written out vs ``--no-tracing``, same rate
              (only when sipwatch has a tracing module), with the OTLP backend down or hung:
              CPU, spans dropped, and forwarding latency vs ``--no-tracing``.
  flood       unanswered INVITEs, each a new call: the sidecar's RSS over the flood levels off at
              its state caps (baseline: its own RSS at the start).

Loopback only. Every process it starts is stopped before it exits. The last line printed is
the whole result as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402

import bench_micro  # noqa: E402
import bench_net  # noqa: E402
from harness import HAVE_SIPP, free_port, metric  # noqa: E402

SECTIONS = ("micro", "latency", "throughput", "tracing", "flood")


# -- formatting ---------------------------------------------------------------------------------
def _f(v, spec=".1f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _ratio(a, b):
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def table(title: str, head: list[str], rows: list[list[str]], note: str | None = None) -> None:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    print(f"\n== {title}")
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if note:
        print(note)


# -- sections -----------------------------------------------------------------------------------
def section_micro(quick: bool) -> dict:
    n, repeats = (1000, 2) if quick else (5000, 5)
    r = bench_micro.run_micro(n, repeats)
    split, find = r["baseline_split_us"], r["baseline_find_us"]
    rows = [[name, _f(us, ".2f"), _f(us / split), _f(us / find), str(r["forwarded"][name])]
            for name, us in r["stages_us"].items()]
    rows.append(["per message (call average)", _f(r["per_message_us"], ".2f"),
                 _f(r["per_message_us"] / split), _f(r["per_message_us"] / find), ""])
    rows.append(["whole call (7 messages)", _f(r["per_call_us"], ".1f"),
                 _f(r["per_call_us"] / split), _f(r["per_call_us"] / find), ""])
    hk = r["housekeeping_per_call_us"]
    rows.append(["per-call tick: histograms + JSON summary", _f(hk, ".1f"), _f(hk / split), _f(hk / find),
                 str(r["call_summaries"])])
    ob = r.get("observer")
    if ob and "error" not in ob:
        per = ob["per_message_us"]
        rows.append(["observer feed, per message (call average)", _f(per, ".2f"), _f(per / split),
                     _f(per / find), ""])
    rows.append(["baseline: INVITE.split(CRLF)", _f(split, ".2f"), "1.0", _f(split / find), ""])
    rows.append(["baseline: bytes.find Call-ID/CSeq/branch", _f(find, ".2f"), _f(find / split), "1.0", ""])
    rows.append(["RttRing.add (numpy stores)", _f(r["ring_add_us"], ".3f"),
                 _f(r["ring_add_us"] / split, ".2f"), _f(r["ring_add_us"] / find, ".2f"), ""])
    rows.append(["baseline: list store", _f(r["baseline_list_store_us"], ".3f"),
                 _f(r["baseline_list_store_us"] / split, ".2f"), "", ""])
    if ob and "error" in ob:
        _progress(f"  observer: not measured ({ob['error']})")
    table(f"core micro-benchmark: receive_datagram, {r['invite_bytes']}-byte INVITE with SDP, "
          f"best of {repeats} x {n} calls",
          ["message", "µs", "x split", "x find", "forwarded"], rows,
          f"  core alone: one core sustains ~{1e6 / r['per_call_us']:.0f} calls/s "
          f"({1e6 / r['per_message_us']:.0f} messages/s) before any socket I/O; with the per-call tick "
          f"~{1e6 / (r['per_call_us'] + hk):.0f} calls/s")
    return r


def target_names() -> list[str]:
    """Proxies compared, in display order: none, the bare relay, the sidecar, Kamailio if installed."""
    names = ["direct", "uvloop relay", "sipwatch"]
    if bench_net.KAMAILIO and bench_net.kamailio_modules():
        names.append("kamailio")
    return names


def section_latency(workdir: Path, quick: bool) -> dict:
    n = 1000 if quick else 5000
    with bench_net.Responder(workdir) as resp:
        started = []
        try:
            for name in target_names():
                t = _make_for(workdir, name, resp.port)
                try:
                    t.__enter__()
                except RuntimeError as exc:
                    _progress(f"  {name}: not measured ({exc})")
                    continue
                started.append(t)
            res = bench_net.latency_probe(started, n, warmup=100 if quick else 300)
        finally:
            for t in reversed(started):
                t.__exit__(None, None, None)
    base = res["direct"]
    relay_add = _ratio_add(res.get("uvloop relay"), base)
    rows = []
    for name, r in res.items():
        add50 = r["p50_us"] - base["p50_us"]
        add99 = r["p99_us"] - base["p99_us"]
        r["added_p50_us"], r["added_p99_us"] = add50, add99
        r["added_vs_relay"] = _ratio(add50, relay_add) if name not in ("direct", "uvloop relay") else None
        rows.append([name, f"{r['answered']}/{r['sent']}", _f(r["p50_us"]), _f(r["p90_us"]),
                     _f(r["p99_us"]), "" if name == "direct" else f"{add50:+.1f}",
                     "" if name == "direct" else f"{add99:+.1f}",
                     _f(r["p50_us"] / base["p50_us"], ".2f"), _f(r["added_vs_relay"], ".2f", "")])
    table(f"added latency: OPTIONS ping-pong, one request outstanding, {n} round trips per target "
          "(interleaved in 5 rounds)",
          ["path", "answered", "p50 µs", "p90 µs", "p99 µs", "+p50 µs", "+p99 µs", "x direct p50",
           "+p50 x relay's"], rows)
    return res


def _ratio_add(r, base):
    if r is None:
        return None
    return r["p50_us"] - base["p50_us"]


def section_throughput(workdir: Path, rates: list[int], duration: float, repeat: int = 1) -> list[dict]:
    runs = []
    for rate, _ in [(r, i) for i in range(repeat) for r in rates]:
        for name in target_names():
            uas_port = free_port()
            target = _make_for(workdir, name, uas_port)
            try:
                with target:
                    r = bench_net.sipp_load(workdir, target, uas_port, rate, duration)
            except RuntimeError as exc:
                _progress(f"  {name} @ {rate}/s: not measured ({exc})")
                continue
            runs.append(r)
            _progress(f"  {name} @ {rate}/s: ok {r['ok']} failed {r['failed']} cpu {_f(r['cpu_pct'])}%")
    runs = aggregate(runs)
    _throughput_table(runs, f"throughput/CPU: SIPp uac_call → proxy → callee, {duration:g}-s runs"
                      f"{f' x {repeat}' if repeat > 1 else ''} (7 messages per call)", "uvloop relay")
    return runs


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (rate, target): sums of counts, medians of CPU figures, the single runs kept."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["rate"], r["target"]), []).append(r)
    out = []
    for (rate, target), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        if len(rs) == 1:
            out.append(rs[0])
            continue
        row = {"target": target, "rate": rate, "duration_s": rs[0]["duration_s"], "repeats": len(rs)}
        for k in ("calls", "ok", "failed", "retransmissions", "proxy_drops", "sipp_drops", "rcvbuf_errors"):
            row[k] = sum(r[k] for r in rs)
        for k in ("cpu_s", "cpu_pct", "cpu_us_per_msg", "rss_peak_mb"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.median(vals) if vals else None
        row["runs"] = rs
        out.append(row)
    order = {n: i for i, n in enumerate(target_names())}
    out.sort(key=lambda r: (r["rate"], order.get(r["target"], 99)))
    return out


def _make_for(workdir: Path, name: str, uas_port: int, *extra: str):
    if name == "direct":
        return bench_net.Direct(workdir, uas_port)
    if name == "uvloop relay":
        return bench_net.Relay(workdir, uas_port)
    if name == "kamailio":
        return bench_net.Kamailio(workdir, uas_port)
    return bench_net.SidecarTarget(workdir, uas_port, *(extra or ("--no-tracing",)), name=name)


def _throughput_table(runs: list[dict], title: str, baseline: str) -> None:
    rows = []
    for r in runs:
        base = next((b for b in runs if b["target"] == baseline and b["rate"] == r["rate"]), None)
        r[f"cpu_vs_{baseline.replace(' ', '_')}"] = _ratio(r["cpu_pct"], base and base["cpu_pct"])
        rows.append([f"{r['rate']}/s", r["target"], f"{r['ok']}/{r['calls']}", str(r["failed"]),
                     str(r["retransmissions"]), _f(r["cpu_pct"]), _f(r["cpu_us_per_msg"]),
                     _f(r[f"cpu_vs_{baseline.replace(' ', '_')}"], ".2f"),
                     _f(r["rss_peak_mb"], ".0f"), str(r["proxy_drops"]), str(r["sipp_drops"]),
                     str(r["rcvbuf_errors"])])
    table(title, ["rate", "target", "ok calls", "failed", "retrans", "CPU %", "CPU µs/msg",
                  f"CPU x {baseline}", "RSS MB", "proxy drops", "SIPp drops", "RcvbufErr Δ"], rows,
          "  CPU = utime+stime of the proxy's process tree from the caller's start to 1 s after it ended,\n"
          "  over the nominal run length (medians when --repeat > 1); µs/msg = that CPU / (7 x successful\n"
          "  calls + retransmissions). drops: the sockets' own drop counters (proxy; SIPp caller+callee);\n"
          "  RcvbufErr Δ is system-wide (other load on the machine counts too).")


def section_tracing(workdir: Path, rate: int, duration: float) -> list[dict] | None:
    if importlib.util.find_spec("sipwatch.tracing") is None:
        print("\n== tracing: skipped (sipwatch has no tracing module yet)")
        return None
    runs = []
    spans = workdir / "spans.jsonl"
    closed = free_port()  # nothing listens: connection refused at once
    with bench_net.OtlpHttpReceiver() as otlp, _blackhole() as silent:
        down = ("sipwatch OTLP backend down", ("--otlp-endpoint", f"http://127.0.0.1:{closed}",
                                                "--sample-ratio", "1"))
        hung = ("sipwatch OTLP backend hung", ("--otlp-endpoint", f"http://127.0.0.1:{silent}",
                                                "--sample-ratio", "1"))
        for name, extra in (
                ("sipwatch --no-tracing", ("--no-tracing",)),
                ("sipwatch OTLP/HTTP 100%", ("--otlp-endpoint", otlp.url, "--otlp-protocol", "http/protobuf",
                                             "--sample-ratio", "1")),
                ("sipwatch spans file 100%", ("--spans-file", str(spans), "--sample-ratio", "1")),
                down, hung):
            uas_port = free_port()
            try:
                with _make_for(workdir, name, uas_port, *extra) as target:
                    r = bench_net.sipp_load(workdir, target, uas_port, rate, duration)
                    sig = target.sidecar.signaling()
                    r["spans_exported"] = metric(sig, "sipwatch_spans_exported_total")
                    r["spans_dropped"] = metric(sig, "sipwatch_spans_dropped_total")
            except RuntimeError as exc:
                _progress(f"  {name} @ {rate}/s: not measured ({exc})")
                continue
            runs.append(r)
            if "OTLP/HTTP" in name:
                r["otlp_requests"], r["otlp_spans"] = otlp.requests, otlp.spans
            _progress(f"  {name} @ {rate}/s: ok {r['ok']} cpu {_f(r['cpu_pct'])}%")
    lines = 0
    if spans.exists():
        with open(spans, "rb") as fh:
            lines = sum(1 for _ in fh)
    for r in runs:
        if "spans file" in r["target"]:
            r["spans_file_lines"] = lines
    _throughput_table(runs, f"tracing cost: 100 % sampled spans vs --no-tracing, {rate}/s, "
                      f"{duration:g}-s runs", "sipwatch --no-tracing")
    for r in runs:
        if "otlp_spans" in r:
            print(f"  OTLP receiver: {r['otlp_spans']} spans in {r['otlp_requests']} requests "
                  f"({r['otlp_spans'] / max(1, r['ok']):.1f} per successful call)")
    print(f"  spans file: {lines} OTLP-JSON lines written")
    for r in runs:
        print(f"  {r['target']}: spans exported {r['spans_exported']:.0f}, dropped {r['spans_dropped']:.0f}")
    # forwarding latency must not notice a dead or hung backend
    with bench_net.Responder(workdir) as resp, _blackhole() as silent:
        targets = []
        try:
            for name, extra in (("sipwatch --no-tracing", ("--no-tracing",)),
                                ("sipwatch OTLP backend down", down[1]),
                                ("sipwatch OTLP backend hung", ("--otlp-endpoint", f"http://127.0.0.1:{silent}",
                                                                "--sample-ratio", "1"))):
                t = _make_for(workdir, name, resp.port, *extra)
                t.__enter__()
                targets.append(t)
            lat = bench_net.latency_probe(targets, 3000, warmup=300)
        finally:
            for t in reversed(targets):
                t.__exit__(None, None, None)
    base = lat["sipwatch --no-tracing"]
    table("forwarding latency with the span backend down or hung (OPTIONS ping-pong, 3000 round trips)",
          ["path", "answered", "p50 µs", "p99 µs", "p50 x no-tracing", "p99 x no-tracing"],
          [[n, f"{r['answered']}/{r['sent']}", _f(r["p50_us"]), _f(r["p99_us"]),
            _f(_ratio(r["p50_us"], base["p50_us"]), ".2f"), _f(_ratio(r["p99_us"], base["p99_us"]), ".2f")]
           for n, r in lat.items()])
    runs.append({"target": "latency with backend down/hung", "latency": lat})
    return runs


class _blackhole:
    """A TCP port that accepts connections into its backlog and never answers: a hung collector."""

    def __enter__(self) -> int:
        import socket
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


FLOOD_RATE = 8000  # INVITEs per second


def section_flood(workdir: Path, quick: bool) -> dict:
    """Unanswered INVITEs, each a new call, as fast as one sender can: the sidecar's memory must
    level off at its state caps (oldest entries evicted and counted) instead of growing."""
    import socket
    total = 40_000 if quick else 240_000
    cap = 20_000
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # sip-signaling that never answers
    sink.bind(("127.0.0.1", 0))
    template = (b"INVITE sip:+15551234567@127.0.0.1 SIP/2.0\r\n"
                b"Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-flood-%d;rport\r\n"
                b"Max-Forwards: 70\r\nFrom: <sip:+15557654321@127.0.0.1>;tag=f%d\r\n"
                b"To: <sip:+15551234567@127.0.0.1>\r\nCall-ID: flood-%d@127.0.0.1\r\n"
                b"CSeq: 1 INVITE\r\nContact: <sip:flood@127.0.0.1:%d>\r\n"
                b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n")
    sdp = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    points = []
    try:
        with _make_for(workdir, "sipwatch", sink.getsockname()[1], "--no-tracing",
                       "--max-transactions", str(cap), "--max-calls", str(cap)) as target:
            src = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            src.bind(("127.0.0.1", 0))
            sport = src.getsockname()[1]
            dest = ("127.0.0.1", target.port)
            t0 = time.monotonic()
            step = total // 10
            points.append((0, _rss_mb(target.pid)))
            for i in range(total):
                src.sendto(template % (sport, i, i, i, sport, len(sdp)) + sdp, dest)
                if i % 100 == 99:  # paced below what the sidecar can take: a flood, not a drop test
                    ahead = t0 + (i + 1) / FLOOD_RATE - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                if (i + 1) % step == 0:
                    points.append((i + 1, _rss_mb(target.pid)))
            elapsed = time.monotonic() - t0
            time.sleep(1.0)
            gw = target.sidecar.gateway()
            src.close()
    finally:
        sink.close()
    received = metric(gw, "sip_requests_total", method="INVITE")
    ev_tx = metric(gw, "sip_state_evictions_total", table="transactions")
    ev_calls = metric(gw, "sip_state_evictions_total", table="calls")
    table(f"flood: {total} unanswered INVITEs (each a new call) at ~{total / elapsed:.0f}/s, "
          f"state caps {cap} transactions / {cap} calls",
          ["INVITEs sent", "sidecar RSS MB"], [[str(n), _f(m)] for n, m in points],
          f"  received {received:.0f}, evicted transactions {ev_tx:.0f}, evicted calls {ev_calls:.0f};\n"
          f"  RSS after the first half vs the end: {points[len(points) // 2][1]:.1f} -> {points[-1][1]:.1f} MB")
    return {"sent": total, "rate": total / elapsed, "rss_mb": points, "received": received,
            "evicted_transactions": ev_tx, "evicted_calls": ev_calls}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- main ---------------------------------------------------------------------------------------
def machine() -> dict:
    def version(mod):
        try:
            from importlib.metadata import version as v
            return v(mod)
        except Exception:
            return None
    sipp = None
    if HAVE_SIPP:
        try:
            out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
            sipp = next((ln.strip() for ln in out.splitlines() if "SIPp" in ln), None)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "python": platform.python_version(), "uvloop": version("uvloop"), "sipp": sipp,
            "kamailio": bench_net.kamailio_version()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: short runs (5 s), fewer samples")
    p.add_argument("--rates", default="300,1000", help="SIPp call rates per second (default 300,1000)")
    p.add_argument("--duration", type=float, help="seconds per SIPp run (default 20, --quick 5)")
    p.add_argument("--repeat", type=int, default=1,
                   help="SIPp runs per rate and target, interleaved; medians are reported (default 1)")
    p.add_argument("--tracing-rate", type=int, help="call rate of the tracing comparison (default: first rate)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    a = p.parse_args(argv)
    a.rates = [int(x) for x in a.rates.split(",") if x.strip()]
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.only if x not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(bad)}")
    if a.duration is None:
        a.duration = 5.0 if a.quick else 20.0
    if a.tracing_rate is None:
        a.tracing_rate = a.rates[0] if a.rates else 300
    return a


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # unwind, so every process started is stopped
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted)
    info = machine()
    print(f"sipwatch bench: {info['cpus']} CPUs, load {' '.join(f'{x:.2f}' for x in info['loadavg'])}, "
          f"Python {info['python']}, uvloop {info['uvloop']}, {info['sipp'] or 'no SIPp'}, "
          f"{info['kamailio'] or 'Kamailio not installed (apt-get install kamailio to add it as a baseline)'}"
          f"{' [quick]' if a.quick else ''}")
    result: dict = {"machine": info, "args": {"quick": a.quick, "rates": a.rates, "duration": a.duration,
                                              "repeat": a.repeat, "only": a.only}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sipwatch-bench-") as tmp:
        workdir = Path(tmp)
        if "micro" in a.only:
            result["micro"] = section_micro(a.quick)
        if "latency" in a.only:
            result["latency"] = section_latency(workdir, a.quick)
        need_sipp = [s for s in ("throughput", "tracing") if s in a.only]
        if need_sipp and not HAVE_SIPP:
            print(f"\n== {', '.join(need_sipp)}: skipped (SIPp not installed: apt-get install sip-tester)")
        else:
            if "throughput" in a.only:
                result["throughput"] = section_throughput(workdir, a.rates, a.duration, a.repeat)
            if "tracing" in a.only:
                result["tracing"] = section_tracing(workdir, a.tracing_rate, a.duration)
        if "flood" in a.only:
            result["flood"] = section_flood(workdir, a.quick)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    result["elapsed_s"] = time.monotonic() - t0
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in result['machine']['loadavg_after'])}; "
          f"{result['elapsed_s']:.0f} s")
    print(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

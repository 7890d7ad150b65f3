"""sipwatch benchmark (``make bench``): ``python -m tests.bench [--quick] [--rates 300,1000,...]
[--duration S] [--targets kamailio,relay,notrace,all] [--only SECTION,...]``.

Every figure is set against baselines measured in the same run on the same machine, because
absolute numbers on a shared 2-core box mean little. The baselines are Kamailio (stateless
``forward()`` with Record-Route, one UDP worker, ``-x fm``; when installed) and a bare uvloop UDP
relay (no SIP work). The sidecar runs twice: ``--no-tracing``, and with every feature on
(Record-Route, trace stamping, RTT histograms, call tracking, call summary logs, spans at 100 %
sampling exported over OTLP/HTTP to a collector in a process of its own *and* to a spans file).
Sections (default: all but throughput, tracing and flood):

  micro           µs per ``ProxyCore.receive_datagram`` for each message of a call, in process.
  pipeline        the all-features proxy in process (ProxyApp, simulated time, no sockets): CPU
                  per message of everything the loop does, past the 32-s linger of finished calls.
  latency         ping-pong OPTIONS (one request outstanding), idle: direct, through each target.
  ladder          rate ladder per target: SIPp caller → target → SIPp callee on loopback, 7
                  messages per call, fixed-rate steps; a step passes when < 0.1 % of its calls
                  fail to complete; a target's ladder stops at its first failing step. Per step:
                  CPU of the target's process tree per forwarded message and as a multiple of
                  Kamailio's at the same step, failed calls, 503s, retransmissions, UDP drops.
                  Then the CPU floors' steps (1000, 4000) twice more for Kamailio and the
                  all-features sidecar, alternating: the floors take the median ratio.
  overload        each target offered 1.5x and 2x its highest passing rate: goodput (completed
                  calls per second) as a fraction of that rate and the 503s the caller received
                  (a 503 with Retry-After ends a call cleanly; it is not a completed call).
  loaded_latency  the ping-pong probe while 1000 calls/s run through each target: round trip
                  through the target minus the round trip to the same upstream directly, at the
                  same moment (interleaved); Kamailio and the all-features sidecar again with
                  every CPU held out of idle (PM QoS, root only: a halted vCPU's wake-up costs
                  more than either proxy's work); then one run per target captured with dumpcap on
                  the loopback: how long the target itself held the probe's request and its response.
  sustained       Kamailio and the all-features sidecar at 4000 calls/s for 75 s, three rounds
                  alternating, judged on the median of the paired ratios: the ladder's 10-s steps
                  end before the sidecar's state stops growing.
  profile         py-spy (``record --pid P -d 10 -f raw``) of the all-features sidecar at 1000
                  calls/s: top self-time functions and top inclusive sipwatch functions.
  throughput      (older) fixed-rate runs of the sidecar vs the relay and Kamailio.
  tracing         (older) spans to OTLP/file vs --no-tracing, and with the OTLP backend down/hung.
  flood           unanswered INVITEs, each a new call: RSS levels off at the state caps.
  hep             CPU per forwarded message with and without ``--hep-endpoint`` (HEP v3 copies of every
                  message to a local collector) at 1000 calls/s (tests/bench_hep.py).
  tcp             SIP over TCP (SIPp -t t1 both ends): CPU per message at 1000 calls/s and the highest
                  passing step of the sidecar and of Kamailio over TCP (tests/bench_tcp.py).
  analyze         ``sipwatch analyze`` vs ``tshark -q -z sip,stat`` on one all-SIP capture (about
                  28,000 frames of recorded SIPp calls), whole processes: CPU user+sys and wall,
                  median of 5 (``--quick``: 1) after a warm-up run (tests/bench_analyze.py).

Then the issue-10 table (CPU at the first two steps, highest passing step, the first failing step)
and the issue-10 floors, measured vs required. Loopback only. Every process it starts is stopped
before it exits. The last line printed is the whole result as one JSON object.
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
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402

import bench_analyze  # noqa: E402
import bench_micro  # noqa: E402
import bench_net  # noqa: E402
from harness import HAVE_SIPP, free_port, metric  # noqa: E402

SECTIONS = ("micro", "pipeline", "latency", "ladder", "overload", "loaded_latency", "sustained", "profile", "throughput",
            "tracing", "flood", "analyze", "hep", "tcp")
DEFAULT_SECTIONS = ("micro", "pipeline", "latency", "ladder", "overload", "loaded_latency", "sustained", "profile", "analyze",
                    "hep", "tcp")
DEFAULT_RATES = "300,1000,2000,3000,4000,5000,6500"
# The four targets of issue 10, in display order: key → display name.
TARGETS = {"kamailio": "kamailio", "relay": "uvloop relay", "notrace": "sipwatch --no-tracing",
           "all": "sipwatch all features"}
ROOT = Path(__file__).resolve().parents[1]
MAX_FAILED = 0.001  # a step passes when fewer than 0.1 % of its calls did not complete


class Budget:
    """Wall-clock budget of a whole run: SIPp runs are not started once it is spent (noted)."""

    def __init__(self, seconds: float):
        self.seconds, self.t0, self.skipped = seconds, time.monotonic(), []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, what: str) -> bool:
        if self.left() > 0:
            return True
        self.skipped.append(what)
        _progress(f"  {what}: skipped (time budget of {self.seconds:.0f} s spent)")
        return False


BUDGET = Budget(float("inf"))


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
def _micro_compiled(tree: str, n: int, repeats: int) -> dict | None:
    """run_micro in a child process that imports the compiled build from ``tree``."""
    code = ("import sys, json; sys.path.insert(0, %r); import bench_micro; "
            "print(json.dumps(bench_micro.run_micro(%d, %d)))" % (str(Path(__file__).parent), n, repeats))
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join((tree, str(ROOT)))}, timeout=600)
    if r.returncode != 0:
        _progress(f"  compiled micro-benchmark failed: {r.stderr[-500:]}")
        return None
    return orjson.loads(r.stdout.strip().splitlines()[-1])


def section_pipeline(quick: bool) -> dict:
    """bench_pipeline in a child process per build: the proxy's own CPU per message, with its
    housekeeping, past the linger of finished calls (see tests/bench_pipeline.py)."""
    rate, seconds, warm = (200.0, 6.0, 3.0) if quick else (1000.0, 45.0, 35.0)
    trees = [("pure", str(ROOT))]
    if os.environ.get("SIPWATCH_TREE"):
        trees.append(("mypyc", os.pathsep.join((os.environ["SIPWATCH_TREE"], str(ROOT)))))
    out: dict = {}
    for build, path in trees:
        code = ("import sys, json; sys.path.insert(0, %r); import bench_pipeline; "
                "print(json.dumps(bench_pipeline.run(%r, %r, %r)))" % (str(Path(__file__).parent), rate, seconds, warm))
        r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": path}, timeout=900)
        if r.returncode != 0:
            _progress(f"  pipeline ({build}) failed: {r.stderr[-500:]}")
            continue
        out[build] = orjson.loads(r.stdout.strip().splitlines()[-1])
    table(f"pipeline: the all-features proxy in process, {rate:g} calls/s for {seconds:g} simulated s, "
          f"counted after {warm:g} s",
          ["build", "messages counted", "CPU µs/msg", "with the loop's own", "calls finished",
           "calls in tables", "internal errors", "max RSS MB"],
          [[b, str(x["counted"]), _f(x["cpu_us_per_msg"], ".2f"), _f(x.get("process_us_per_msg"), ".2f"),
            str(x["calls_finished"]),
            str(x["calls_in_tables"]), str(x["internal_errors"]), _f(x["max_rss_mb"], ".0f")] for b, x in out.items()],
          "  ProxyApp with every feature on fed SIPp's call flow in simulated time: no sockets, no wake-ups; the\n"
          "  20-ms housekeeping ticks (timers, summaries, span hand-off, collector) included; the loop's own\n"
          "  work (building the messages, the event heap) measured in a second pass without the proxy and\n"
          "  taken off ('with the loop's own': the process's CPU before that);\n"
          "  " + ("counted once finished calls have lingered their 32 s and are being freed, as in a long run."
                  if warm > 32 else "shorter than the 32-s linger of finished calls: none is freed (--quick)."))
    return out


def section_micro(quick: bool) -> dict:
    n, repeats = (1000, 2) if quick else (5000, 5)
    r = bench_micro.run_micro(n, repeats)
    tree = os.environ.get("SIPWATCH_TREE")
    c = _micro_compiled(tree, n, repeats) if tree else None
    if c is not None:
        r["compiled"] = c
    split, find = r["baseline_split_us"], r["baseline_find_us"]

    def row(name, us, fmt, extra="", cus=None):
        return [name, _f(us, fmt), _f(cus, fmt, "-"), _f(us / split), _f(us / find), extra]
    rows = [row(name, us, ".2f", str(r["forwarded"][name]), c and c["stages_us"][name])
            for name, us in r["stages_us"].items()]
    rows.append(row("per message (call average)", r["per_message_us"], ".2f", "", c and c["per_message_us"]))
    rows.append(row("whole call (7 messages)", r["per_call_us"], ".1f", "", c and c["per_call_us"]))
    hk = r["housekeeping_per_call_us"]
    rows.append(row("per-call tick: histograms + JSON summary", hk, ".1f", str(r["call_summaries"]),
                    c and c["housekeeping_per_call_us"]))
    ob = r.get("observer")
    if ob and "error" not in ob:
        cob = c and c.get("observer")
        rows.append(row("observer feed, per message (call average)", ob["per_message_us"], ".2f", "",
                        cob["per_message_us"] if cob and "error" not in cob else None))
    rows.append(["baseline: INVITE.split(CRLF)", _f(split, ".2f"), "", "1.0", _f(split / find), ""])
    rows.append(["baseline: bytes.find Call-ID/CSeq/branch", _f(find, ".2f"), "", _f(find / split), "1.0", ""])
    rows.append(["RttRing.add (numpy stores)", _f(r["ring_add_us"], ".3f"), "",
                 _f(r["ring_add_us"] / split, ".2f"), _f(r["ring_add_us"] / find, ".2f"), ""])
    rows.append(["baseline: list store", _f(r["baseline_list_store_us"], ".3f"), "",
                 _f(r["baseline_list_store_us"] / split, ".2f"), "", ""])
    if ob and "error" in ob:
        _progress(f"  observer: not measured ({ob['error']})")
    best = c or r
    table(f"core micro-benchmark: receive_datagram, {r['invite_bytes']}-byte INVITE with SDP, "
          f"best of {repeats} x {n} calls; pure Python and the mypyc build",
          ["message", "µs", "µs mypyc", "x split", "x find", "forwarded"], rows,
          f"  core alone ({'mypyc' if c else 'pure Python'}): one core sustains ~{1e6 / best['per_call_us']:.0f} "
          f"calls/s ({1e6 / best['per_message_us']:.0f} messages/s) before any socket I/O; with the per-call "
          f"tick ~{1e6 / (best['per_call_us'] + best['housekeeping_per_call_us']):.0f} calls/s")
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
    _throughput_table(runs, f"throughput/CPU: SIPp caller → proxy → callee, {duration:g}-s runs"
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


# -- issue 10: targets, rate ladder, overload, latency under load, profile ---------------------
def available_targets(wanted: list[str]) -> list[str]:
    """Keys of TARGETS to run, Kamailio dropped (with a note) when it is not installed."""
    out = []
    for key in wanted:
        if key == "kamailio" and not (bench_net.KAMAILIO and bench_net.kamailio_modules()):
            _progress("  kamailio: not installed (apt-get install kamailio to add it as the baseline)")
            continue
        out.append(key)
    return out


class Features:
    """The all-features sidecar's span sinks: one OTLP collector process for the whole run, a new
    spans file per target start."""

    def __init__(self, workdir: Path, collector):
        self.workdir, self.collector, self.n = workdir, collector, 0

    def args(self) -> tuple[list[str], Path]:
        self.n += 1
        spans = self.workdir / f"spans-{self.n}.jsonl"
        return (["--otlp-endpoint", self.collector.url, "--otlp-protocol", "http/protobuf",
                 "--sample-ratio", "1", "--spans-file", str(spans)], spans)


def make_target(workdir: Path, key: str, upstream_port: int, features: Features | None = None,
                per_source: bool = False, invite_limit: int | None = None):
    name = TARGETS[key]
    if key == "kamailio":
        return bench_net.Kamailio(workdir, upstream_port, name=name, invite_limit=invite_limit)
    if key == "relay":
        return bench_net.Relay(workdir, upstream_port, per_source=per_source, name=name)
    if key == "notrace":
        return bench_net.SidecarTarget(workdir, upstream_port, "--no-tracing", name=name)
    extra, spans = features.args()
    t = bench_net.SidecarTarget(workdir, upstream_port, *extra, name=name)
    t.spans_file = spans
    return t


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def _count_spans(path: Path) -> int:
    """Spans in an OTLP-JSON lines file: occurrences of the ``"spanId":`` key (``parentSpanId`` is
    another key)."""
    if not path.exists():
        return 0
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            n += line.count(b'"spanId":')
    return n


SPANS_PER_CALL = 4  # the bench's call flow: the call, its INVITE, ACK and BYE
SPANS_QUIET_S = 1.0
SPANS_WAIT_S = 5.0


def _spans_settled(collector, otlp0: dict, want: int) -> None:
    """Wait (at most SPANS_WAIT_S) until the collector got ``want`` spans since ``otlp0`` or its
    count stopped moving for SPANS_QUIET_S (spans the sidecar dropped never come), so that the
    sidecar's counters, read next, speak of the same spans."""
    deadline = time.monotonic() + SPANS_WAIT_S
    last, since = None, time.monotonic()
    while True:
        got = collector.stats()["spans"] - otlp0["spans"]
        now = time.monotonic()
        if got >= want or now > deadline:
            return
        if got != last:
            last, since = got, now
        elif got > 0 and now - since >= SPANS_QUIET_S:
            return
        time.sleep(0.1)


def _sidecar_figures(target, r: dict, features: Features | None, otlp0: dict | None) -> None:
    """Add the sidecar's own counts to a run, while it runs: 503s it sent, spans exported/dropped."""
    if not isinstance(target, bench_net.SidecarTarget):
        return
    if features is not None and otlp0 is not None:
        _spans_settled(features.collector, otlp0, SPANS_PER_CALL * r.get("completed", 0))
    try:
        gw, sig = target.sidecar.gateway(), target.sidecar.signaling()
        r["overload_rejected"] = metric(gw, "sip_overload_rejected_total")
        r["spans_exported"] = metric(sig, "sipwatch_spans_exported_total")
        r["spans_dropped"] = metric(sig, "sipwatch_spans_dropped_total")
        r["gc_deep"] = metric(gw, "sipwatch_gc_deep_collections_total")
        r["gc_deep_s"] = metric(gw, "sipwatch_gc_deep_seconds_total")
    except OSError as exc:
        r["metrics_error"] = str(exc)


def _spans_delivered(target, r: dict, features: Features, otlp0: dict) -> None:
    """What the collector decoded and the spans file holds from a run, read once the sidecar has
    stopped (its stop delivers what its span worker still held). Read while it ran, after a fixed
    half second, a 1-s step on a loaded machine had shown none: the worker runs at idle priority
    and had not yet had the CPU to deliver them."""
    o1 = features.collector.stats()
    r["otlp_spans"] = o1["spans"] - otlp0["spans"]
    r["otlp_requests"] = o1["requests"] - otlp0["requests"]
    r["spans_file_lines"] = _count_lines(target.spans_file)
    r["spans_file_spans"] = _count_spans(target.spans_file)
    target.spans_file.unlink(missing_ok=True)  # up to hundreds of MB per step


def load_step(workdir: Path, key: str, rate: int, duration: float, features: Features | None,
              cap: "CpuCap | None" = None, invite_limit: int | None = None) -> dict | None:
    """One fixed-rate SIPp run through a freshly started target; None when it would not start.
    With ``cap`` the target (the proxy and its span worker) is moved into that CPU-limited group
    before the caller starts, and its spans are not waited for (the limit holds the worker back).
    ``invite_limit``: Kamailio refuses new INVITEs beyond that many a second (503)."""
    name = TARGETS[key] if cap is None else f"capped {TARGETS[key]}"
    if invite_limit is not None:
        name += f" (503 beyond {invite_limit}/s)"
    if not BUDGET.allows(f"{name} @ {rate}/s"):
        return None
    uas_port = free_port()
    t0 = t1 = None
    try:
        target = make_target(workdir, key, uas_port, features, invite_limit=invite_limit)
        with target:
            if cap is not None:
                cap.add(bench_net.tree_pids(target.pid))
                t0 = cap.throttled_s()
            otlp0 = features.collector.stats() if key == "all" and cap is None else None
            r = bench_net.SippLoad(workdir, target, uas_port, rate, duration).start().finish()
            if cap is not None:
                t1 = cap.throttled_s()
            _sidecar_figures(target, r, features if otlp0 is not None else None, otlp0)
        if otlp0 is not None:
            _spans_delivered(target, r, features, otlp0)
        elif cap is not None and getattr(target, "spans_file", None) is not None:
            target.spans_file.unlink(missing_ok=True)
    except RuntimeError as exc:
        _progress(f"  {name} @ {rate}/s: not measured ({exc})")
        return None
    r["key"] = key
    r["passed"] = bench_net.passed(r, MAX_FAILED)
    if cap is not None:
        r["throttled_s"] = None if t0 is None or t1 is None else t1 - t0
    _progress(f"  {name} @ {rate}/s: completed {r['completed']}/{r['calls']} 503 {r['refused_503']} "
              + (f"counted {_f(r.get('overload_rejected'), '.0f')} " if cap is not None else "")
              + f"cpu {_f(r['cpu_pct'])}% {_f(r['cpu_us_per_msg'])} µs/msg steal {_f(r['steal_pct'], '.2f')}% "
              f"{'pass' if r['passed'] else 'FAIL'}")
    return r


def ladder(run_step, keys: list[str], rates: list[int], retries: int = 0) -> dict:
    """Climb ``rates`` for every target, interleaved step by step (all targets at a step before the
    next step), each target stopping at its first failing step. ``run_step(key, rate)`` returns a
    run dict with ``passed`` (or None: not measured, which also ends that target's ladder). A
    failing step is run again up to ``retries`` times (a shared machine has bad seconds); the
    first passing run counts, the failed ones are kept in its ``failed_tries``."""
    steps: dict[str, list[dict]] = {k: [] for k in keys}
    climbing = list(keys)
    for rate in rates:
        for key in list(climbing):
            r = run_step(key, rate)
            tries = []
            while r is not None and not r["passed"] and len(tries) < retries:
                tries.append(r)
                _progress(f"  {key} @ {rate}/s failed: running the step again")
                r = run_step(key, rate) or r
                if r is tries[-1]:
                    break
            if r is None:
                climbing.remove(key)
                continue
            if tries:
                r["failed_tries"] = tries
            steps[key].append(r)
            if not r["passed"]:
                climbing.remove(key)
        if not climbing:
            break
    out = {}
    for key, runs in steps.items():
        passing = [r for r in runs if r["passed"]]
        failing = next((r for r in runs if not r["passed"]), None)
        best = passing[-1] if passing else None
        out[key] = {"target": TARGETS.get(key, key), "steps": runs,
                    "max_passing_rate": best["rate"] if best else None,
                    "max_passing_cpu_pct": best["cpu_pct"] if best else None,
                    "top_step_passed": bool(runs) and runs[-1]["passed"] and runs[-1]["rate"] == rates[-1],
                    "first_failing_rate": failing["rate"] if failing else None,
                    "first_failing_pct": (100.0 * (failing["calls"] - failing["completed"]) / failing["calls"]
                                          if failing else None)}
    # CPU per message as a multiple of Kamailio's at the same step
    kam = {r["rate"]: r for r in out.get("kamailio", {}).get("steps", [])}
    for key, t in out.items():
        for r in t["steps"]:
            k = kam.get(r["rate"])
            r["cpu_per_msg_vs_kamailio"] = _ratio(r["cpu_us_per_msg"], k and k["cpu_us_per_msg"])
            r["cpu_vs_kamailio"] = _ratio(r["cpu_pct"], k and k["cpu_pct"])
    return out


def _step(res: dict, key: str, rate: int) -> dict | None:
    return next((r for r in res.get(key, {}).get("steps", []) if r["rate"] == rate), None)


def section_ladder(workdir: Path, keys: list[str], rates: list[int], duration: float,
                   features: Features | None, retries: int = 1) -> dict:
    res = ladder(lambda key, rate: load_step(workdir, key, rate, duration, features), keys, rates, retries)
    rows = []
    for rate in rates:
        for key in keys:
            r = _step(res, key, rate)
            if r is None:
                continue
            rows.append([f"{rate}/s", r["target"], _f(r["offered_cps"], ".0f"),
                         f"{r['completed']}/{r['calls']}", str(r["failed"]),
                         str(r["refused_503"]), str(r["retransmissions"]), _f(r["cpu_pct"]),
                         _f(r["cpu_us_per_msg"]), _f(r["cpu_per_msg_vs_kamailio"], ".2f"),
                         str(r["proxy_drops"]), str(r["sipp_drops"]), str(r["rcvbuf_errors"]),
                         ("pass" if r["passed"] else "FAIL") + (" *" if harness_limited(r) else "")
                         + (f" (try {len(r['failed_tries']) + 1})" if r.get("failed_tries") else "")])
    table(f"rate ladder: SIPp caller → target → SIPp callee, {duration:g}-s steps, 7 messages per call, "
          f"pass = < {100 * MAX_FAILED:g}% of calls not completed; a target stops at its first failing step",
          ["rate", "target", "placed/s", "completed", "failed", "503", "retrans", "CPU %", "CPU µs/msg",
           "µs/msg x kamailio", "proxy drops", "SIPp drops", "RcvbufErr Δ", ""], rows,
          "  CPU = utime+stime of the target's process tree from the caller's start to 1 s after it ended,\n"
          "  over the step length; µs/msg = that CPU / (7 x completed + 2 x refused calls + retransmissions).\n"
          "  placed/s = calls SIPp placed / the time it took (below the step: SIPp itself could not keep up);\n"
          "  failed = calls neither completed nor refused with 503; drops: the sockets' own drop counters\n"
          "  (target; SIPp caller+callee); RcvbufErr Δ is system-wide. * = SIPp itself fell behind (placed\n"
          "  < 97% of the step's rate, or its sockets dropped): the harness, not only the target, limited it.\n"
          "  A failing step is run once more before a ladder stops ('try 2': the first try failed).")
    if "all" in res:
        for r in res["all"]["steps"]:
            if "otlp_spans" in r:
                print(f"  all features @ {r['rate']}/s: collector decoded {r['otlp_spans']} spans in "
                      f"{r['otlp_requests']} requests, spans file {r['spans_file_spans']} spans in "
                      f"{r['spans_file_lines']} lines, sidecar "
                      f"exported {_f(r.get('spans_exported'), '.0f')} dropped {_f(r.get('spans_dropped'), '.0f')} "
                      f"({r['otlp_spans'] / max(1, r['completed']):.1f} collector spans per completed call)")
    return res


FLOOR_RATES = (1000, 4000)  # the steps issue 10's CPU floors are judged at
# ... and its tracing floor (all features against --no-tracing): at 1000/s alone, where a step's
# CPU per message is mostly wake-ups, --no-tracing's own three rounds once spread 1.52x with no
# steal at all (26.4/17.4/24.9 µs) and the floor went unjudged; at 4000/s the per-message work
# dominates and paired rounds agree within ~1.1x
TRACING_RATES = (1000, 4000)
# A target's floor rounds agree when the highest is within this factor of the lowest. Undisturbed,
# they were within 1.1-1.25x on the 2-core machine; one run had Kamailio at 16.7, 44.1 and 31.1
# µs/msg at 1000 calls/s (13.6-14.7 in three runs right after), which made a median ratio of 1.18x
# out of rounds that measured the machine, not the proxies.
ROUNDS_AGREE = 1.5
# A CPU-per-message figure from a run in which the host took more than this share of the ticks
# (steal, /proc/stat) judges nothing: one run had Kamailio at 53.4 µs/msg at 1000 calls/s with 33%
# steal against 19.6 without, and three 4000/s rounds with 5.7-8.7% steal on Kamailio's runs only
# all agreed with each other while flattering the sidecar's ratio.
STEAL_MAX = 5.0


def _round_ratio(rounds: list[dict], steals: list[dict], over: str) -> tuple[list[float], list[float], list[float]]:
    """Each round's all-features/``over`` CPU ratio, the host's steal in it (the higher of the two
    runs) and the ratios of the rounds the host left alone (steal <= STEAL_MAX)."""
    ratios, steal, clean = [], [], []
    for x, st in zip(rounds, steals):
        if x.get(over) and "all" in x:
            v, s = x["all"] / x[over], max(st.get("all", 0.0), st.get(over, 0.0))
            ratios.append(v)
            steal.append(s)
            if s <= STEAL_MAX:
                clean.append(v)
    return ratios, steal, clean


# Rounds run at the floors' steps besides the ladder's: the median of five, not three. Three
# rounds of the tracing ratio at 4000 calls/s in one run read 1.35, 1.19 and 1.26 (a spread wider
# than the distance to the floor), and a span_cpu sitting's medians of the same build moved by 0.09
# from one sitting to the next; two rounds more cost ~3 minutes.
FLOOR_EXTRA_ROUNDS = 4


def section_floor_runs(workdir: Path, ladder_res: dict, duration: float, features: Features | None,
                       extra: int = FLOOR_EXTRA_ROUNDS, run_step=None, retries: int = 2) -> dict:
    """The CPU floors' steps again for Kamailio and the all-features sidecar (and, at the tracing
    floor's step, ``--no-tracing``), ``extra`` more rounds each, the targets' order reversed every
    round. One step's CPU per message swings by ±20% on a shared 2-core machine (Kamailio's own
    figure at one step has been both the lowest and the highest of its ladder), enough to decide a
    floor set at a ratio: each round's ratio pairs runs minutes apart at most, and the floor is
    judged on the median ratio of the ladder's run and these. A round in which the host took more
    than STEAL_MAX% of the ticks judges nothing; while fewer than two rounds are clean, another is
    run, at most ``retries`` more. ``run_step(key, rate)`` is load_step's stand-in in tests."""
    if run_step is None:
        def run_step(key, rate):
            return load_step(workdir, key, rate, duration, features)
    out: dict = {}
    for rate in FLOOR_RATES:
        keys = ["kamailio", "all"] + (["notrace"] if rate in TRACING_RATES else [])
        first = {k: _step(ladder_res, k, rate) for k in keys}
        if any(first[k] is None or not first[k]["passed"] for k in ("kamailio", "all")):
            continue
        if "notrace" in first and (first["notrace"] is None or not first["notrace"]["passed"]):
            keys.remove("notrace")
            del first["notrace"]
        rounds = [{k: r["cpu_us_per_msg"] for k, r in first.items()}]
        steals = [{k: r.get("steal_pct") or 0.0 for k, r in first.items()}]

        def short_of_clean() -> bool:  # fewer than two undisturbed rounds for a floor judged here
            return any(len(_round_ratio(rounds, steals, over)[2]) < 2
                       for over in ("kamailio", "notrace") if over in keys)
        n = 0
        while n < extra or (n < extra + retries and short_of_clean()):
            order = ["notrace", "all", "kamailio"] if n % 2 == 0 else ["kamailio", "all", "notrace"]
            got, steal = {}, {}
            for key in (k for k in order if k in keys):
                r = run_step(key, rate)
                if r is not None and r["passed"]:
                    got[key] = r["cpu_us_per_msg"]
                    steal[key] = r.get("steal_pct") or 0.0
            n += 1
            if "all" in got and len(got) > 1:
                rounds.append(got)
                steals.append(steal)
        ratios, steal_k, clean = _round_ratio(rounds, steals, "kamailio")
        if ratios:
            spread = {k: _spread([x[k] for x in rounds if k in x]) for k in keys}
            out[rate] = {"rounds": rounds, "ratios": ratios, "ratio": statistics.median(ratios),
                         "spread": spread, "agree": spread["kamailio"] <= ROUNDS_AGREE and spread["all"] <= ROUNDS_AGREE,
                         "steal": steal_k, "clean_ratios": clean}
            t_ratios, t_steal, t_clean = _round_ratio(rounds, steals, "notrace")
            if t_ratios:
                out[rate]["tracing"] = {
                    "ratios": t_ratios, "ratio": statistics.median(t_ratios), "steal": t_steal,
                    "clean_ratios": t_clean,
                    "agree": spread["notrace"] <= ROUNDS_AGREE and spread["all"] <= ROUNDS_AGREE}
    if out:
        table(f"CPU per message at the floors' steps: the ladder's run and {extra} more rounds per target "
              f"(up to {retries} more while fewer than two rounds are undisturbed), alternating order",
              ["rate", "kamailio µs/msg", "all features µs/msg", "ratio of each round", "median ratio",
               "rounds agree", "steal % of each round", "--no-tracing µs/msg", "all / --no-tracing"],
              [[f"{rate}/s", " ".join(_f(x.get("kamailio")) for x in v["rounds"]),
                " ".join(_f(x["all"]) for x in v["rounds"]), " ".join(f"{x:.2f}" for x in v["ratios"]),
                f"{v['ratio']:.2f}", "yes" if v["agree"] else "no: " + _disagreeing(v),
                " ".join(_f(x) for x in v["steal"]),
                " ".join(_f(x.get("notrace")) for x in v["rounds"]) if "tracing" in v else "",
                " ".join(f"{x:.2f}" for x in v["tracing"]["ratios"]) if "tracing" in v else ""]
               for rate, v in out.items()],
              f"  a target's rounds agree when its highest is within {ROUNDS_AGREE}x its lowest; when they do not,\n"
              "  something else took the machine during a round and the floor is not judged from them; a round in\n"
              f"  which the host took more than {STEAL_MAX:g}% of the ticks (steal, the higher of the two runs a\n"
              "  ratio pairs) is left out of the verdict, which needs two rounds without; the tracing floor is\n"
              "  judged on the same rounds' all-features / --no-tracing ratios at "
              f"{' and '.join(f'{r}/s' for r in TRACING_RATES)}, met when every step judged meets it.")
    return out


def _disagreeing(runs: dict, keys=("kamailio", "all")) -> str:
    """The targets whose floor rounds are too far apart, with their spread: ``kamailio 2.64x``."""
    return ", ".join(f"{k} {x:.2f}x" for k, x in runs["spread"].items() if k in keys and x > ROUNDS_AGREE)


def _rounds_verdict(again: dict, disagreeing: str) -> tuple[float, bool, str]:
    """(value, judged, shown) of a floor judged on repeated rounds (``again``: ratios, ratio,
    clean_ratios, steal, agree): the median of the rounds the host left alone, none when the rounds
    disagree or fewer than two are clean."""
    v = again["ratio"]
    shown = (f"{v:.2f}x (median of {len(again['ratios'])} rounds: "
             f"{' '.join(f'{x:.2f}' for x in again['ratios'])})")
    clean = again.get("clean_ratios", again["ratios"])
    if not again.get("agree", True):  # one target's rounds far apart: disturbed, no verdict
        return v, False, shown + f"; not judged: the rounds disagree ({disagreeing})"
    if len(clean) < 2:  # the host took the machine in all rounds but one: no verdict
        return v, False, shown + (f"; not judged: host steal above {STEAL_MAX:g}% in "
                                  f"{len(again['ratios']) - len(clean)} of the rounds "
                                  f"({' '.join(_f(x) for x in again['steal'])}%)")
    if len(clean) < len(again["ratios"]):  # judged on the rounds the host left alone
        v = statistics.median(clean)
        shown += f"; judged on the {len(clean)} rounds without host steal: {v:.2f}x"
    return v, True, shown


def _spread(xs: list[float]) -> float:
    """Highest over lowest of a target's rounds (inf when one is 0)."""
    lo = min(xs)
    return max(xs) / lo if lo > 0 else float("inf")


def harness_limited(r: dict) -> bool:
    return bool(r.get("sipp_drops")) or (r.get("offered_cps") or 0) < 0.97 * r["rate"]


def overload_rates(best: int | None, factors=(1.5, 2.0)) -> list[tuple[float, int]]:
    return [] if not best else [(f, int(round(best * f))) for f in factors]


def section_overload(workdir: Path, keys: list[str], ladder_res: dict, duration: float,
                     features: Features | None) -> dict:
    out: dict = {}
    for factor in (1.5, 2.0):
        for key in keys:
            best = ladder_res.get(key, {}).get("max_passing_rate")
            if not best:
                _progress(f"  {TARGETS[key]}: no passing step, no overload run")
                continue
            rate = int(round(best * factor))
            r = load_step(workdir, key, rate, duration, features)
            if r is None:
                continue
            r["factor"], r["base_rate"] = factor, best
            r["goodput_fraction"] = r["goodput_cps"] / best
            out.setdefault(key, []).append(r)
    rows = []
    for key in keys:
        for r in out.get(key, []):
            rows.append([r["target"], f"{r['factor']:g}x {r['base_rate']} = {r['rate']}/s",
                         _f(r["offered_cps"], ".0f"), f"{r['completed']}/{r['calls']}", str(r["refused_503"]),
                         _f(r.get("overload_rejected"), ".0f", ""), str(r["failed"]), str(r["retransmissions"]),
                         _f(r["goodput_cps"], ".0f"), _f(100 * r["goodput_fraction"], ".1f"),
                         _f(r["cpu_pct"]), str(r["proxy_drops"]), _f(r.get("spans_dropped"), ".0f", "")])
    table(f"overload: offered 1.5x and 2x each target's highest passing rate, {duration:g}-s runs",
          ["target", "offered", "achieved/s", "completed", "503 recv", "503 counted", "failed", "retrans",
           "goodput/s", "% of best", "CPU %", "proxy drops", "spans dropped"], rows,
          "  achieved/s = calls SIPp placed / the time it took to place them (SIPp's own ceiling here is\n"
          "  near 8000/s); goodput = completed calls / max(step length, that time); '503 counted' = the\n"
          "  sidecar's sip_overload_rejected_total. A 503 without Retry-After counts as a failed call.\n"
          "  spans dropped = the sidecar's sipwatch_spans_dropped_total: spans of admitted calls its span\n"
          "  pipeline could not take (refused calls make none).")
    return out


# The capped overload run: a CPU limit as a pod's sets (a CFS quota), so that one SIPp caller
# can offer more than the sidecar carries on a 2-CPU machine where, unlimited, it carries what SIPp
# can place (13,000 calls/s offered, 69% of a CPU, at 2x the ladder's top step)
CAP_CPU = 0.25
# A coarse climb, then the gap between its last passing and its first failing step split in
# CAP_SPLITS (the shedding floors are judged against the highest passing step, and a coarse grid
# under the knee flatters them: 1.5x and 2x of 4000 read 126% and 114%, of 5000 in another run 88%
# and 76%). It starts low: on a slower host (an AMD EPYC vCPU) the knee at a quarter of a CPU fell
# near 1500 calls/s, below where the fixed grid this replaced began.
CAP_RATES = (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000)
CAP_SPLITS = 4
# runs of each overload step under the limit, judged on their median: the goodput of one 10-s run
# moved by about +-6% between runs of the same code on the Intel VM (4173-4683 calls/s at 9000
# offered, a 4500 knee), and on the AMD VM from 1429 to 2640 calls/s at 4500 offered (35 runs of
# the same code in two hours, a 2250 knee): a median of 3 there was a coin toss around the floor
CAP_ROUNDS = 5
# runs that confirm the knee: the overload steps are judged on the median of CAP_ROUNDS runs
# against it, so it is read the same way, from most of its runs and not from the one that passed.
# On the AMD VM the climb's single tries read the same code's knee at 2000, 2250 and 2500 in
# different runs, and the 2250 step shed 0-15% from run to run
CAP_CONFIRM = 3  # (odd, and more than the climb's two tries of a step)
# a gap between a knee and a step above it that did not confirm is split (CAP_SPLITS) when wider
# than this: the grid the climb's own split reaches
CAP_MIN_GAP = 250
# Kamailio for comparison: its knee at a quarter of a CPU would be beyond what one SIPp caller
# offers at 2x, so it is held to less (its knee near 4000 calls/s at 0.12 on the 2-vCPU machine)
KAM_CAP_CPU = 0.12
KAM_CAP_RATES = (500, 1000, 2000, 3000, 4000, 5000, 6000)


class CpuCap:
    """A cgroup with a CPU quota (``cpus`` of one CPU per 100 ms), cgroup v2 or the v1 ``cpu``
    controller, whichever this machine mounts writable; ``add(pids)`` moves processes into it.
    ``available`` is False (with ``why``) where neither can be made (no root, a read-only
    mount): the capped run is then skipped. Removed at exit, once its processes are gone."""

    def __init__(self, cpus: float):
        self.cpus, self.path, self.why = cpus, None, None
        name = f"sipwatch-bench-{os.getpid()}"
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")
        try:
            if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
                if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                    (v2 / "cgroup.subtree_control").write_text("+cpu")
                self.path = v2 / name
                self.path.mkdir()
                (self.path / "cpu.max").write_text(f"{int(cpus * 100_000)} 100000")
            elif (v1 / "cpu.cfs_quota_us").exists():
                self.path = v1 / name
                self.path.mkdir()
                (self.path / "cpu.cfs_period_us").write_text("100000")
                (self.path / "cpu.cfs_quota_us").write_text(str(int(cpus * 100_000)))
            else:
                self.why = "no cgroup cpu controller"
        except OSError as exc:
            self.why = f"cgroup not writable ({exc.strerror})"
            self._remove()

    @property
    def available(self) -> bool:
        return self.why is None and self.path is not None

    def add(self, pids) -> None:
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self) -> float | None:
        """Seconds the quota held the group back so far (cpu.stat), None where unread."""
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                if k == "throttled_usec":
                    return int(v) / 1e6
                if k == "throttled_time":
                    return int(v) / 1e9
        except (OSError, ValueError, TypeError):
            pass
        return None

    def _remove(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # (its processes are still exiting)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._remove()


def _capped_runs(workdir: Path, key: str, duration: float, features: Features | None, cap: "CpuCap", rates,
                 limit_at_knee: bool = False) -> tuple[list, int | None, list]:
    """Under ``cap``: a short ladder over ``rates`` to the highest passing step (a failing step is
    run once more, as the main ladder does, and the ladder stops when that fails too), the gap
    to the first failing step climbed again in CAP_SPLITS (the same rule), then the knee
    confirmed (the highest of the passing steps that passes in most of at least CAP_CONFIRM runs,
    going down a step at a time, the gap below a step that did not confirm split as above),
    then 1.5x and 2x of the knee, CAP_ROUNDS times each,
    alternating; with ``limit_at_knee`` those run with new INVITEs refused beyond the knee's rate
    (Kamailio). (The knee decides both floors: one pass of the same code read it at 5000 calls/s,
    the next at 3500, its 4000 step shedding 1.6%; and a climb that goes on while one of two tries
    passes reads the highest step that passed once by luck.)"""
    steps, over = [], []

    def climb(ladder) -> tuple[int | None, int | None]:
        """(highest passing, first failing) of ``ladder``: the first failing is None when every
        step passed or one would not run."""
        good = None
        for rate in ladder:
            r = load_step(workdir, key, rate, duration, features, cap)
            if r is None:
                return good, None
            steps.append(r)
            if not r["passed"]:
                r = load_step(workdir, key, rate, duration, features, cap)
                if r is None:
                    return good, None
                r["retry"] = True
                steps.append(r)
                if not r["passed"]:
                    return good, rate
            good = rate
        return good, None

    def confirmed(rate: int) -> bool:
        """Whether most runs at ``rate`` pass: those of the climb (one, or a failed try and its
        retry), then more up to CAP_CONFIRM (odd: no tie)."""
        runs = [r for r in steps if r["rate"] == rate]
        while len(runs) < CAP_CONFIRM:
            r = load_step(workdir, key, rate, duration, features, cap)
            if r is None:
                break
            r["confirm"] = True
            steps.append(r)
            runs.append(r)
        return 2 * sum(r["passed"] for r in runs) > len(runs)

    def splits(low: int, high: int) -> list[int]:
        return sorted({int(round((low + (high - low) * k / CAP_SPLITS) / 50) * 50) for k in range(1, CAP_SPLITS)}
                      - {low, high})

    best, failed = climb(rates)
    split = set()
    if best is not None and failed is not None:
        split.add((best, failed))
        best = climb(splits(best, failed))[0] or best
    while best is not None:  # the knee: the highest step that passed and passes in most of its runs
        passed = sorted({r["rate"] for r in steps if r["passed"]}, reverse=True)
        knee = next((rate for rate in passed if confirmed(rate)), None)
        # a step above it that did not confirm, with the gap down to it never split: split it
        # (else the knee fell a whole coarse step: 2000 shed 3% and 6% when confirmed, and the
        # knee read 1000 with 1500 never tried, which flatters both floors)
        above = min((rate for rate in passed if knee is None or rate > knee), default=None)
        low = knee if knee is not None else 0
        if above is None or (low, above) in split or above - low <= CAP_MIN_GAP:
            best = knee
            break
        split.add((low, above))
        climb(splits(low, above))
    if best is not None:
        for i in range(CAP_ROUNDS):
            for factor in ((1.5, 2.0) if i % 2 == 0 else (2.0, 1.5)):
                r = load_step(workdir, key, int(round(best * factor)), duration, features, cap,
                              invite_limit=best if limit_at_knee else None)
                if r is None:
                    continue
                r["factor"], r["base_rate"], r["round"] = factor, best, i + 1
                r["goodput_fraction"] = r["goodput_cps"] / best
                over.append(r)
        over.sort(key=lambda r: (r["factor"], r["round"]))
    return steps, best, over


def _capped_table(title: str, out: dict, note: str) -> None:
    rows = [[f"{r['rate']}/s" + (f" ({r['factor']:g}x {r['base_rate']}, run {r['round']})" if "factor" in r else "")
             + (" (again)" if r.get("retry") else "") + (" (confirming)" if r.get("confirm") else ""),
             _f(r["offered_cps"], ".0f"), f"{r['completed']}/{r['calls']}", str(r["refused_503"]),
             _f(r.get("overload_rejected"), ".0f", ""), str(r["failed"]), str(r["retransmissions"]),
             _f(r["goodput_cps"], ".0f"), _f(100 * r["goodput_fraction"], ".1f") if "goodput_fraction" in r else "",
             _f(r["cpu_pct"]), _f(r.get("throttled_s"), ".1f", ""), "pass" if r["passed"] else "FAIL"]
            for r in out["steps"] + out["overload"]]
    table(title, ["offered", "achieved/s", "completed", "503 recv", "503 counted", "failed", "retrans", "goodput/s",
                  "% of best", "CPU %", "throttled s", "step"], rows, note)


def section_capped_overload(workdir: Path, duration: float, features: Features, cpus: float = CAP_CPU,
                            rates=CAP_RATES) -> dict:
    """The all-features sidecar held to ``cpus`` of a CPU: its highest passing step, then 1.5x and
    2x of that rate, CAP_ROUNDS times each (``_capped_runs``): past this knee the shedding floor is
    judged (503 + Retry-After received and counted, the median goodput >= 90%)."""
    out: dict = {"cpus": cpus, "steps": [], "overload": []}
    with CpuCap(cpus) as cap:
        if not cap.available:
            out["skipped"] = cap.why
            print(f"\n== overload under a CPU limit: skipped ({cap.why})")
            return out
        out["steps"], out["max_passing_rate"], out["overload"] = _capped_runs(workdir, "all", duration, features,
                                                                              cap, rates)
    _capped_table(f"overload under a CPU limit: the all-features sidecar held to {cpus:g} of a CPU (cgroup quota, as "
                  f"a pod's CPU limit), {duration:g}-s runs; its highest passing step (confirmed: passing in "
                  f"{CAP_CONFIRM // 2 + 1} of {CAP_CONFIRM} runs), then 1.5x and 2x of it", out,
                  "  where one SIPp caller cannot offer more than the unlimited sidecar carries, a CPU limit is how its\n"
                  "  knee is reached on the same machine; throttled s = time the quota held the sidecar back (cpu.stat).")
    return out


def section_capped_kamailio(workdir: Path, duration: float, cpus: float = KAM_CAP_CPU, rates=KAM_CAP_RATES) -> dict:
    """Kamailio past its knee under a CPU limit, for comparison with the sidecar's shedding: it
    has no overload detection of its own, so past its highest passing step it refuses new INVITEs
    beyond that step's rate with 503 + Retry-After (a fixed rate limit that knows its capacity)."""
    out: dict = {"cpus": cpus, "steps": [], "overload": []}
    with CpuCap(cpus) as cap:
        if not cap.available:
            out["skipped"] = cap.why
            return out
        out["steps"], out["max_passing_rate"], out["overload"] = _capped_runs(workdir, "kamailio", duration, None,
                                                                              cap, rates, limit_at_knee=True)
    _capped_table(f"Kamailio under a CPU limit for comparison: held to {cpus:g} of a CPU (its knee within one SIPp "
                  f"caller's reach), {duration:g}-s runs; past its highest passing step new INVITEs beyond that rate "
                  "get 503 + Retry-After (ratelimit TAILDROP, 1-s interval)", out,
                  "  Kamailio sheds nothing by itself: the fixed limit at its knee is the best a static rule can do.")
    return out


def _loaded_latency_once(workdir: Path, key: str, rate: int, duration: float, n: int,
                         features: Features | None) -> dict | None:
    """One ping-pong measurement through ``key`` while ``rate`` calls/s run through it."""
    uas_port = free_port()
    try:
        with bench_net.Splitter(workdir, uas_port) as split:
            target = make_target(workdir, key, split.port, features, per_source=True)
            with target:
                load = bench_net.SippLoad(workdir, target, uas_port, rate, duration).start()
                try:
                    time.sleep(min(2.0, duration / 5))
                    direct = bench_net.Direct(workdir, split.port)
                    lat = bench_net.latency_probe([direct, target], n, warmup=100, rounds=10,
                                                  deadline=load.t0 + duration - 0.5)
                finally:
                    r = load.finish()
    except RuntimeError as exc:
        _progress(f"  {TARGETS[key]}: not measured ({exc})")
        return None
    d, t = lat["direct"], lat[target.name]
    x = {"target": target.name, "rate": rate, "load": r, "load_passed": bench_net.passed(r, MAX_FAILED),
         "steal_pct": r["steal_pct"],
         "direct": d, "through": t,
         "added_p50_us": t["p50_us"] - d["p50_us"], "added_p99_us": t["p99_us"] - d["p99_us"]}
    _progress(f"  {target.name}: +p50 {x['added_p50_us']:.1f} µs, +p99 {x['added_p99_us']:.1f} µs "
              f"(load completed {r['completed']}/{r['calls']})")
    return x


def _residence_once(workdir: Path, key: str, rate: int, n: int, features: Features | None,
                    seconds: float) -> dict | None:
    """The probe through ``key`` alone while ``rate`` calls/s run through it, captured on the loopback
    (see bench_net.probe_residence): how long the target itself held each probe datagram. A run of
    its own: the capture's CPU would disturb the floors' runs."""
    uas_port = free_port()
    pcap = workdir / f"residence-{key}.pcapng"
    try:
        with bench_net.Splitter(workdir, uas_port) as split:
            target = make_target(workdir, key, split.port, features, per_source=True)
            with target:
                load = bench_net.SippLoad(workdir, target, uas_port, rate, seconds).start()
                try:
                    time.sleep(seconds / 3)
                    cap = bench_net.LoopbackCapture(pcap, [target.port, split.port]).start()
                    try:
                        bench_net.latency_probe([target], n, warmup=100, rounds=1, deadline=load.t0 + seconds - 0.5)
                    finally:
                        cap.stop()
                finally:
                    r = load.finish()
        x = bench_net.probe_residence(pcap, target.port, split.port)
    except RuntimeError as exc:
        _progress(f"  {TARGETS[key]}: residence not measured ({exc})")
        return None
    finally:
        pcap.unlink(missing_ok=True)
    x.update(target=TARGETS[key], load_passed=bench_net.passed(r, MAX_FAILED),
             steal_pct=r["steal_pct"])
    return x


def section_residence(workdir: Path, keys: list[str], rate: int, n: int, features: Features | None,
                      into: dict, seconds: float = 6.0) -> None:
    """Where the added round trip goes: the time each target held the probe's OPTIONS and its 200,
    from kernel timestamps (one captured run per target). ``into``: the loaded-latency results, whose
    targets get a ``residence`` entry."""
    if not bench_net.DUMPCAP:
        print("\n== residence: skipped (dumpcap not installed)")
        return
    rows, got = [], {}
    for key in keys:
        if not BUDGET.allows(f"residence: {TARGETS[key]}"):
            continue
        x = _residence_once(workdir, key, rate, n, features, seconds)
        if x is None or not x["matched"]:
            continue
        got[key] = x
        if key in into:
            into[key]["residence"] = x
        rows.append([x["target"], f"{x['matched']}/{x['probes']}", _f(x["request_p50_us"]), _f(x["request_p90_us"]),
                     _f(x["request_p99_us"]), _f(x["response_p50_us"]), _f(x["response_p90_us"]),
                     _f(x["response_p99_us"]), "ok" if x["load_passed"] else "FAILED", _f(x["steal_pct"], ".1f")])
    kam = got.get("kamailio")
    for row, x in zip(rows, got.values()):
        row.insert(8, _f(x["request_p50_us"] + x["response_p50_us"]
                         - (kam["request_p50_us"] + kam["response_p50_us"]), "+.1f") if kam else "-")
    table(f"residence at {rate} calls/s: how long each target held the probe's datagrams (one captured run each)",
          ["target", "matched", "request p50", "p90", "p99", "response p50", "p90", "p99", "p50s vs kamailio",
           "load", "steal %"], rows,
          "  µs from a datagram leaving its sender to the target's copy of it leaving the target, both\n"
          "  timestamped by the kernel on the loopback (dumpcap): the target's wake-up and its work, without the\n"
          "  probe's wake-ups or the idle states that move the direct round trip; 'p50s vs kamailio' adds the\n"
          "  request's and the response's p50 and compares that sum with Kamailio's.")


def section_loaded_latency(workdir: Path, keys: list[str], rate: int, duration: float, n: int,
                           features: Features | None, repeats: int = 3) -> dict:
    """Ping-pong through each target while ``rate`` calls/s run through it, against the same upstream
    (a splitter in front of the SIPp callee that answers the probe itself) reached directly.

    One such run swings by tens of µs at p50 and by a millisecond at p99 on a shared 2-core machine
    (a bare relay once measured +160 µs, once +40): each target is measured ``repeats`` times, the
    targets' order reversed every round, and the medians of the added p50 and p99 are the figures.

    Then Kamailio and the all-features sidecar again with every CPU held out of its idle states
    (:class:`bench_net.CpusHeldAwake`), in ``out[key]["held"]``: the same figures without the
    wake-ups of halted vCPUs, which on this kind of VM cost more than either proxy's own work."""
    out = _latency_runs(workdir, keys, rate, duration, n, features, repeats, "")
    _latency_table(out, rate, repeats)
    held_keys = [k for k in ("kamailio", "all") if k in out]
    if held_keys and repeats > 1:
        with bench_net.CpusHeldAwake() as awake:
            held = _latency_runs(workdir, held_keys, rate, duration, n, features, repeats,
                                 " (CPUs held awake)") if awake.held else {}
        if not awake.held:
            print("\n== latency with the CPUs held awake: skipped (/dev/cpu_dma_latency not writable)")
        for key, x in held.items():
            out[key]["held"] = {f: x[f] for f in ("added_p50_us", "added_p99_us", "added_p50_runs_us",
                                                  "added_p99_runs_us", "direct_p50_runs_us", "steal_runs_pct",
                                                  "runs", "load_passed")}
        if held:
            table(f"added round trip at {rate} calls/s with every CPU held out of idle (PM QoS 0 µs); "
                  f"median of {repeats} runs per target",
                  ["target", "+p50 µs", "+p99 µs", "+p50 vs kamailio", "+p50 of each run", "+p99 of each run",
                   "direct p50 of each run", "load"],
                  [[x["target"], f"{x['added_p50_us']:+.1f}", f"{x['added_p99_us']:+.1f}",
                    _f(x["added_p50_vs_kamailio_us"], "+.1f", ""),
                    " ".join(f"{v:+.0f}" for v in x["added_p50_runs_us"]),
                    " ".join(f"{v:+.0f}" for v in x["added_p99_runs_us"]),
                    " ".join(f"{v:.0f}" for v in x["direct_p50_runs_us"]),
                    "ok" if x["load_passed"] else "FAILED"] for x in held.values()],
                  "  the same runs as above, while a PM QoS request keeps every CPU from entering an idle state\n"
                  "  (the guest's idle loop polls instead of halting the vCPU): each wake-up on the probe's path\n"
                  "  then costs what the proxies' own work and the kernel's hand-off cost, not the host's wake-up\n"
                  "  of a halted vCPU; the floor above is judged on the runs without it.")
    return out


def _latency_runs(workdir: Path, keys: list[str], rate: int, duration: float, n: int,
                  features: Features | None, repeats: int, what: str) -> dict:
    """section_loaded_latency's runs and their medians per target (``what``: the conditions, for the
    budget's messages)."""
    runs: dict[str, list[dict]] = {}
    for k in range(repeats):
        for key in (keys if k % 2 == 0 else keys[::-1]):
            if not BUDGET.allows(f"latency under load{what}: {TARGETS[key]}"):
                continue
            x = _loaded_latency_once(workdir, key, rate, duration, n, features)
            if x is not None:
                runs.setdefault(key, []).append(x)
    out = {}
    for key in keys:  # (in the table's order)
        xs = runs.get(key)
        if not xs:
            continue
        mid = sorted(xs, key=lambda x: x["added_p50_us"])[(len(xs) - 1) // 2]
        out[key] = dict(mid, runs=len(xs), load_passed=all(x["load_passed"] for x in xs),
                        added_p50_us=statistics.median(x["added_p50_us"] for x in xs),
                        added_p99_us=statistics.median(x["added_p99_us"] for x in xs),
                        added_p50_runs_us=[round(x["added_p50_us"], 1) for x in xs],
                        added_p99_runs_us=[round(x["added_p99_us"], 1) for x in xs],
                        via_p50_us=statistics.median(x["through"]["p50_us"] for x in xs),
                        direct_p50_runs_us=[round(x["direct"]["p50_us"], 1) for x in xs],
                        steal_runs_pct=[x["steal_pct"] for x in xs])
    kam = out.get("kamailio")
    for x in out.values():
        x["added_p50_vs_kamailio_us"] = x["added_p50_us"] - kam["added_p50_us"] if kam else None
        x["via_p50_vs_kamailio_us"] = x["via_p50_us"] - kam["via_p50_us"] if kam else None
    return out


def _latency_table(out: dict, rate: int, repeats: int) -> None:
    """The table of :func:`_latency_runs`' figures for the runs without the CPUs held awake."""
    rows = []
    for x in out.values():
        rows.append([x["target"], f"{x['load']['completed']}/{x['load']['calls']}",
                     f"{x['through']['answered']}/{x['through']['sent']}",
                     _f(x["direct"]["p50_us"]), _f(x["through"]["p50_us"]), _f(x["direct"]["p99_us"]),
                     _f(x["through"]["p99_us"]), f"{x['added_p50_us']:+.1f}", f"{x['added_p99_us']:+.1f}",
                     _f(x["added_p50_vs_kamailio_us"], "+.1f", ""),
                     " ".join(f"{v:+.0f}" for v in x["added_p50_runs_us"]),
                     " ".join(f"{v:+.0f}" for v in x["added_p99_runs_us"]),
                     " ".join(f"{v:.0f}" for v in x["direct_p50_runs_us"]),
                     _f(x["via_p50_vs_kamailio_us"], "+.1f", ""),
                     " ".join(_f(v, ".1f") for v in x["steal_runs_pct"])])
    table(f"added round trip at {rate} calls/s: OPTIONS ping-pong through the loaded target vs to the same "
          f"upstream directly, interleaved; median of {repeats} runs per target",
          ["target", "load completed", "probes", "direct p50", "via p50", "direct p99", "via p99",
           "+p50 µs", "+p99 µs", "+p50 vs kamailio", "+p50 of each run", "+p99 of each run",
           "direct p50 of each run", "via p50 vs kamailio", "steal % of each run"], rows,
          "  the upstream is a splitter in front of the SIPp callee that answers the probe's OPTIONS itself;\n"
          "  the relay runs with one upstream socket per source here (the probe and SIPp share it);\n"
          "  +p50/+p99 are medians over the runs; the other columns are from the run with the median +p50;\n"
          "  the direct round trip itself swings with how busy the target keeps the CPUs (a halted vCPU wakes\n"
          "  slowly): \"via p50 vs kamailio\" (medians) compares what a call through each one sees, beside the\n"
          "  floor's +p50 (through minus direct, per run); steal: the machine's ticks the hypervisor gave to\n"
          "  someone else during each run (/proc/stat), above ~1% the run's latencies measure the host too.")


def section_sustained(workdir: Path, keys: list[str], rate: int, seconds: float, features: Features | None,
                      rounds: int = 1) -> dict:
    """Kamailio and the all-features sidecar carrying ``rate`` calls/s for ``seconds``: the ladder's
    10-s steps end before the sidecar's finished calls stop piling up (they linger timer_b, 32 s)
    and before anything that runs once a minute. A deep garbage collection set off by that growth
    once stopped the loop for 1.35 s a minute into a 4000 calls/s run: 6494 INVITEs got a 503,
    in another run 4496 calls failed, while every 10-s step at 4000 passed.

    ``rounds`` pairs, alternating (K S, S K, ...): one pair's ratio moved from 1.58 to 2.13 between
    full runs of the same code, and the paired 75-s runs of one build spread 13%. Each target's
    entry is its run with the median CPU, with every run's figure beside it (``runs_cpu_us``), held
    only when every run held; the sidecar's carries each round's ratio to Kamailio's and its steal."""
    targets = [k for k in ("kamailio", "all") if k in keys]
    runs: dict[str, list[dict]] = {k: [] for k in targets}
    cpus, steals = [], []  # each round's {target: µs a message} and {target: steal %}, as the floor runs'
    for i in range(rounds):
        got = {}
        for key in (targets if i % 2 == 0 else targets[::-1]):
            r = load_step(workdir, key, rate, seconds, features)
            if r is not None:
                r["held"] = r["passed"] and not r["refused_503"]
                runs[key].append(r)
                if r.get("cpu_us_per_msg"):
                    got[key] = r
        cpus.append({k: r["cpu_us_per_msg"] for k, r in got.items()})
        steals.append({k: r.get("steal_pct") or 0.0 for k, r in got.items()})
    ratios, ratio_steals, _ = _round_ratio(cpus, steals, "kamailio")
    out = {}
    for key, rs in runs.items():
        if not rs:
            continue
        cpus = [r.get("cpu_us_per_msg") for r in rs]
        measured = sorted((x for x in rs if x.get("cpu_us_per_msg")), key=lambda x: x["cpu_us_per_msg"])
        r = dict(measured[(len(measured) - 1) // 2] if measured else rs[0])
        r["runs_cpu_us"] = cpus
        r["held"] = all(x["held"] for x in rs)
        r["rounds"] = len(rs)
        out[key] = r
    if "all" in out and ratios:
        out["all"]["ratio_rounds"] = ratios
        out["all"]["ratio_steal_pct"] = ratio_steals
    table(f"sustained: {rate} calls/s for {seconds:g} s",
          ["target", "completed", "failed", "503 recv", "CPU µs/msg", "user/sys: main", "user/sys: children",
           "RSS peak MB", "deep GCs", "stopped s", "spans dropped", "held", "steal %"],
          [[r["target"], f"{r['completed']}/{r['calls']}", str(r["failed"]), str(r["refused_503"]),
            _f(r["cpu_us_per_msg"]), _split_cell(r, "main"), _split_cell(r, "children"),
            _f(r.get("rss_peak_mb"), ".0f"), _f(r.get("gc_deep"), ".0f"),
            _f(r.get("gc_deep_s"), ".2f"), _f(r.get("spans_dropped"), ".0f", ""), "yes" if r["held"] else "NO",
            _f(r.get("steal_pct"), ".2f")]
           for r in out.values()],
          f"  {rounds} run(s) per target, alternating; the row is each target's run with the median CPU,\n"
          "  held only when every run held: runs "
          + "; ".join(f"{TARGETS[k]} {' '.join(_f(x) for x in r['runs_cpu_us'])} µs" for k, r in out.items())
          + ("; ratio of each round " + " ".join(f"{x:.2f}" for x in out["all"]["ratio_rounds"])
             if "ratio_rounds" in out.get("all", {}) else "") + "\n"
          "  held = fewer than 0.1% of the calls failed and no call got a 503; 'deep GCs' and 'stopped s' are\n"
          "  the sidecar's sipwatch_gc_deep_collections_total and sipwatch_gc_deep_seconds_total; user/sys: the\n"
          "  CPU µs/msg split by process (main: the proxy, or Kamailio's attendant; children: the span worker,\n"
          "  Kamailio's workers) and into user and system time; spans dropped: the sidecar's\n"
          "  sipwatch_spans_dropped_total (the span worker yields the CPU to everything else: on a saturated\n"
          "  box spans are what is shed first); steal: the\n"
          f"  host's share of the ticks during the run (above {STEAL_MAX:g}% the CPU ratio is not judged).")
    return out


def _split_cell(r: dict, who: str) -> str:
    """``user/sys`` µs/msg of the run's ``main`` process or its ``children``."""
    sp = r.get("cpu_split_us_per_msg")
    return "-" if not sp else f"{sp[who + '_user']:.1f}/{sp[who + '_sys']:.1f}"


def section_profile(workdir: Path, rate: int, seconds: int, features: Features) -> dict:
    if not bench_net.PY_SPY:
        print("\n== profile: skipped (py-spy not installed: .venv/bin/pip install py-spy)")
        return {"skipped": "py-spy not installed"}
    if not BUDGET.allows("profile"):
        print("\n== profile: skipped (time budget spent)")
        return {"skipped": "time budget spent"}
    uas_port = free_port()
    duration = seconds + 3
    with make_target(workdir, "all", uas_port, features) as target:
        load = bench_net.SippLoad(workdir, target, uas_port, rate, duration).start()
        try:
            time.sleep(1.0)
            spy = bench_net.PySpy(workdir, target.pid, seconds).start()
            raw, log = spy.finish()
        finally:
            r = load.finish()
    if not raw:
        why = next((ln for ln in log.splitlines() if "rror" in ln or "ermission" in ln), log.strip()[-300:])
        print(f"\n== profile: skipped (py-spy produced nothing: {why})")
        return {"skipped": why, "load": r}
    prof = bench_net.profile_summary(raw, 10)
    title = (f"profile: py-spy record -d {seconds} -f raw of the all-features sidecar at {rate} calls/s "
             f"({prof['samples']} samples, load completed {r['completed']}/{r['calls']}, CPU {_f(r['cpu_pct'])}%)")
    table(title + " - top self time", ["function", "samples", "% of samples"],
          [[x["function"], str(x["samples"]), _f(x["pct"])] for x in prof["self"]])
    table("profile - top inclusive sipwatch functions", ["function", "samples", "% of samples"],
          [[x["function"], str(x["samples"]), _f(x["pct"])] for x in prof["inclusive"]],
          "  py-spy sees Python frames only: self time of the function that runs the event loop (run_proxy)\n"
          "  is uvloop's C code under it - waiting in epoll and the socket syscalls - plus its own lines.")
    prof["load"] = r
    prof["rate"] = rate
    return prof


# -- issue 10 summary -----------------------------------------------------------------------------
def issue_table(ladder_res: dict, keys: list[str], rates: list[int]) -> list[list[str]]:
    """Rows of issue 10's table: CPU at the first two steps, highest passing step, first failing step."""
    c1, c2 = (rates + [None, None])[:2]
    rows = []
    labels = {"kamailio": "Kamailio, 1 worker, `-x fm`", "relay": "bare uvloop relay (no SIP work)",
              "notrace": "sipwatch `--no-tracing`", "all": "sipwatch, all features (OTLP + spans file)"}
    for key in keys:
        t = ladder_res.get(key)
        if t is None:
            continue

        def cpu_at(rate):
            r = _step(ladder_res, key, rate) if rate else None
            if r is None:
                return "-"
            return f"{_f(r['cpu_pct'])}%" if r["passed"] else f"fails ({_f(r['cpu_pct'])}%)"
        best = t["max_passing_rate"]
        best_cell = "none" if best is None else (
            f"{'>= ' if t['top_step_passed'] else ''}{best} ({_f(t['max_passing_cpu_pct'])}% CPU)")
        fail_cell = ("-" if t["first_failing_rate"] is None else
                     f"{t['first_failing_rate']}/s: {t['first_failing_pct']:.1f}% of calls failed")
        rows.append([labels[key], cpu_at(c1), cpu_at(c2), best_cell, fail_cell])
    return rows


def floors(result: dict) -> list[dict]:
    """Issue 10's floors for the all-features sidecar, measured vs required (None = not measured)."""
    lad = result.get("ladder") or {}
    out = []

    def add(name, value, ok, shown):
        out.append({"floor": name, "value": value, "ok": ok, "shown": shown})
    runs = result.get("floor_runs") or {}
    for rate in FLOOR_RATES:
        r = _step(lad, "all", rate)
        again = runs.get(rate)
        judged = True
        if again and len(again["ratios"]) > 1:
            v, judged, shown = _rounds_verdict(again, _disagreeing(again))
        else:
            v = r and r["cpu_per_msg_vs_kamailio"]
            shown = "not measured" if v is None else f"{v:.2f}x{'' if r['passed'] else ' (step failed)'}"
        add(f"CPU/msg at {rate}/s <= 2x Kamailio's", v, None if v is None or not judged else v <= 2.0, shown)
    t = lad.get("all")
    best = t and t["max_passing_rate"]
    if t is None:
        add("highest passing step >= 4000/s", None, None, "not measured")
    else:
        open_ended = t["top_step_passed"] and (best or 0) < 4000  # the ladder stopped below 4000
        add("highest passing step >= 4000/s", best, None if open_ended else (best or 0) >= 4000,
            f"{'>= ' if t['top_step_passed'] else ''}{best or 'none'}"
            + (f" (Kamailio {'>= ' if lad['kamailio']['top_step_passed'] else ''}"
               f"{lad['kamailio']['max_passing_rate']})" if "kamailio" in lad else ""))
    ll = result.get("loaded_latency") or {}
    a, k = ll.get("all"), ll.get("kamailio")
    at = f"{(a or k or {}).get('rate', 1000)}/s"
    v = a and k and a["added_p50_us"] - k["added_p50_us"]
    add(f"added p50 at {at} within 50 µs of Kamailio's", v, None if v is None else v <= 50,
        "not measured" if v is None else f"{a['added_p50_us']:+.1f} vs {k['added_p50_us']:+.1f} µs ({v:+.1f})"
        + (f"; through p50 {a['via_p50_us'] - k['via_p50_us']:+.1f} vs Kamailio's"
           if "via_p50_us" in a and "via_p50_us" in k else ""))
    if a and k and "held" in a and "held" in k:  # (the same runs with the CPUs held out of idle)
        ah, kh = a["held"]["added_p50_us"], k["held"]["added_p50_us"]
        add(f"added p50 at {at} within 50 µs of Kamailio's, CPUs held awake", ah - kh, ah - kh <= 50,
            f"{ah:+.1f} vs {kh:+.1f} µs ({ah - kh:+.1f})")
    v = a and a["added_p99_us"]
    add(f"added p99 at {at} <= 1 ms", v, None if v is None else v <= 1000,
        "not measured" if v is None else f"{v:+.1f} µs")
    # the floor rounds' all-features / --no-tracing ratios at each step that ran them: met when
    # every step judged meets it (the value shown is the dearest), not judged when none could be
    judged, shown_all = [], []
    for rate in TRACING_RATES:
        again = (runs.get(rate) or {}).get("tracing")
        if again and len(again["ratios"]) > 1:
            v, ok, shown = _rounds_verdict(again, _disagreeing(runs[rate], ("notrace", "all")))
            shown_all.append((v, shown.replace(" (median", f" at {rate}/s (median", 1)))
            if ok:
                judged.append(v)
    if shown_all:
        v = max(judged) if judged else max(x for x, _ in shown_all)
        add("tracing at 100% <= 1.25x --no-tracing CPU", v, v <= 1.25 if judged else None,
            "; ".join(s for _, s in shown_all))
    else:  # the ladder's steps alone
        tc = result.get("tracing_cost") or {}
        v = tc.get("ratio")
        add("tracing at 100% <= 1.25x --no-tracing CPU", v, None if v is None else v <= 1.25,
            "not measured" if v is None else f"{v:.2f}x at {tc['rate']}/s")
    ov = (result.get("overload") or {}).get("all", [])
    for factor in (1.5, 2.0):
        r = next((x for x in ov if x["factor"] == factor), None)
        v = r and r["goodput_fraction"]
        shown = "not measured" if v is None else f"{100 * v:.1f}% ({r['refused_503']} 503s)"
        if r and r.get("sipp_drops"):  # (said beside the verdict, which stands: the sidecar's share is unknown)
            shown += f"; SIPp's sockets dropped {r['sipp_drops']} datagrams"
        add(f"goodput at {factor:g}x the highest passing rate >= 90%", v, None if v is None else v >= 0.9, shown)
    v = sum(x["refused_503"] for x in ov) if ov else None
    # (beyond capacity only when some call of the overload steps was not carried: where every call
    # completed, the offered load never passed the sidecar's capacity and no 503 was due; the
    # floor is then not reached here, neither met nor failed)
    beyond = any(x.get("completed") is None or x["completed"] < x.get("calls", 0) for x in ov)
    shown = "not measured" if v is None else f"{v} 503s, sidecar counted " \
        f"{_f(sum(x.get('overload_rejected') or 0 for x in ov), '.0f')}"
    if v == 0 and not beyond:
        top = max(ov, key=lambda x: x.get("rate", 0))
        shown += (f"; not reached: every call of both steps completed (up to "
                  f"{top.get('offered_cps') or top.get('rate') or 0:.0f}"
                  f" calls/s offered, CPU {_f(top['cpu_pct'])}%), so none was beyond capacity "
                  "(the live shedding test: tests/test_overload.py)")
    add("503 + Retry-After beyond capacity (caller received)", v,
        None if v is None or (v == 0 and not beyond) else v > 0, shown)
    capped = result.get("capped_overload") or {}
    cov = capped.get("overload") or []
    kam = result.get("capped_overload_kamailio") or {}
    if cov:  # the knee reached under a CPU limit (see section_capped_overload)
        base = capped.get("max_passing_rate")
        # (the knee is confirmed by most of its runs: a higher step that passed once is named too)
        once = max((x["rate"] for x in capped.get("steps") or [] if x.get("passed")), default=base)
        knee = f"{base} calls/s" + (f", confirmed; {once} passed once" if once != base else "")
        for factor in (1.5, 2.0):
            runs = [x for x in cov if x.get("factor") == factor]
            if runs:
                gs = [x["goodput_fraction"] for x in runs]
                g = statistics.median(gs)
                each = f"median of {len(gs)} runs: {' '.join(f'{100 * x:.1f}' for x in gs)}; " if len(gs) > 1 else ""
                kruns = [x for x in kam.get("overload") or [] if x.get("factor") == factor]
                vs = (f"; Kamailio at {kam['cpus']:g} CPU, 503 beyond its {kam['max_passing_rate']}/s: "
                      f"{100 * statistics.median(x['goodput_fraction'] for x in kruns):.1f}%, "
                      f"{sum(x.get('failed', 0) for x in kruns)} calls failed") if kruns else ""
                add(f"under a {capped['cpus']:g}-CPU limit: goodput at {factor:g}x its highest passing rate >= 90%", g,
                    g >= 0.9, f"{100 * g:.1f}% of {knee} ({each}"
                    f"{sum(x['refused_503'] for x in runs)} 503s received, "
                    f"{_f(sum(x.get('overload_rejected') or 0 for x in runs), '.0f')} counted, "
                    f"{sum(x.get('failed', 0) for x in runs)} calls failed{vs})")
        got = sum(x["refused_503"] for x in cov)
        counted = sum(x.get("overload_rejected") or 0 for x in cov)
        # (counted >= received: a refused INVITE whose 503 was lost is retransmitted and refused again)
        add(f"under a {capped['cpus']:g}-CPU limit: 503 + Retry-After beyond capacity (received, counted)", got,
            got > 0 and counted >= got, f"{got} 503s received, {counted:.0f} counted")
    sus = result.get("sustained") or {}
    su, sk = sus.get("all"), sus.get("kamailio")
    if su and sk and su.get("cpu_us_per_msg") and sk.get("cpu_us_per_msg"):
        # (the 10-s steps end before the tables reach their caps; this is the steady state's ratio;
        # of several rounds, judged as the floor runs' are: _rounds_verdict)
        ratios = su.get("ratio_rounds") or []
        if len(ratios) > 1:
            steals = su["ratio_steal_pct"]
            v, judged, shown = _rounds_verdict(
                {"ratios": ratios, "ratio": statistics.median(ratios), "steal": steals,
                 "clean_ratios": [x for x, st in zip(ratios, steals) if st <= STEAL_MAX]}, "")
            shown += f"; the median pair {su['cpu_us_per_msg']:.1f} vs {sk['cpu_us_per_msg']:.1f} µs over {su['duration_s']:g} s"
        else:
            v = su["cpu_us_per_msg"] / sk["cpu_us_per_msg"]
            shown = f"{v:.2f}x ({su['cpu_us_per_msg']:.1f} vs {sk['cpu_us_per_msg']:.1f} µs over {su['duration_s']:g} s)"
            steal = max(su.get("steal_pct") or 0.0, sk.get("steal_pct") or 0.0)
            judged = steal <= STEAL_MAX
            if not judged:
                shown += f"; not judged: host steal {steal:.1f}% during a run"
        add(f"CPU/msg sustained at {su['rate']}/s <= 2x Kamailio's", v, v <= 2.0 if judged else None,
            shown)
    add("highest passing step holds when sustained (4000/s, 75 s)" if su is None else
        f"{su['rate']}/s held for {su['duration_s']:g} s (no 503, < 0.1% failed)", su and su["held"],
        None if su is None else su["held"],
        "not measured" if su is None else f"{su['completed']}/{su['calls']} completed, {su['refused_503']} 503s, "
        f"deep GCs {_f(su.get('gc_deep'), '.0f')}")
    return out


def tracing_cost(ladder_res: dict) -> dict:
    """all-features CPU / --no-tracing CPU at each step both ran; the headline at 1000/s when both
    were measured there, else at the highest common step."""
    a = {r["rate"]: r for r in ladder_res.get("all", {}).get("steps", [])}
    n = {r["rate"]: r for r in ladder_res.get("notrace", {}).get("steps", [])}
    per = {rate: _ratio(a[rate]["cpu_pct"], n[rate]["cpu_pct"]) for rate in sorted(set(a) & set(n))}
    per = {k: v for k, v in per.items() if v is not None}
    if not per:
        return {}
    rate = 1000 if 1000 in per else max(per)
    return {"rate": rate, "ratio": per[rate], "per_step": per}


def print_summary(result: dict, keys: list[str], rates: list[int]) -> None:
    lad = result.get("ladder")
    if lad:
        c1, c2 = (rates + ["-", "-"])[:2]
        table(f"issue 10: {result['args']['duration']:g}-s steps, pass = < {100 * MAX_FAILED:g}% failed calls "
              f"(rates {', '.join(map(str, rates))})",
              ["", f"{c1} calls/s CPU", f"{c2} calls/s", "max calls/s that passes", "at the first failing step"],
              issue_table(lad, keys, rates))
        tc = result.get("tracing_cost")
        if tc:
            print("  tracing cost (all features CPU / --no-tracing CPU): "
                  + ", ".join(f"{r}/s {v:.2f}x" for r, v in tc["per_step"].items()))
    fl = result.get("floors")
    if fl:
        table("issue 10 floors (sipwatch with all features)", ["floor", "measured", ""],
              [[x["floor"], x["shown"], "-" if x["ok"] is None else ("ok" if x["ok"] else "NOT MET")]
               for x in fl])


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
    git = {}
    root = Path(__file__).resolve().parents[1]
    try:
        git["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sipwatch"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        git["sipwatch_uncommitted"] = sorted(ln[3:] for ln in dirty if ln.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()), "git": git,
            "free_page_reporting": free_page_reporting(),
            "python": platform.python_version(), "interpreter": interpreter(),
            "uvloop": version("uvloop"), "sipp": sipp, "kamailio": bench_net.kamailio_version()}


def interpreter() -> dict:
    """How the interpreter running the sidecar (this one: the bench starts it with
    ``sys.executable``) was built, and a speed probe of it, so runs on differently built
    interpreters are not compared as if they were one.

    The build changes the sidecar's CPU per message: measured on the 2-vCPU machine (paired,
    alternating, four rounds at 1000 calls/s, every feature on, the same source compiled by
    each), Debian 12's ``python3`` (3.11.2, libpython linked into the executable, the
    distribution's optimized build; probe 61 ns) took 4.5 % less than a pyenv build of 3.11.7
    with pyenv's defaults (shared libpython, no PGO or LTO; probe 75 ns). The image runs
    ``python:3.11-slim``, built with ``--enable-optimizations --with-lto``: what a node runs is
    the optimized kind. ``probe_ns``: one pass of a small loop of calls, attribute updates and
    dict stores, best of five: an interpreter-bound figure to set beside the ratios."""
    libpython = "static"
    try:
        with open("/proc/self/maps") as f:
            if any("libpython" in line for line in f):
                libpython = "shared"
    except OSError:
        libpython = "unknown"

    class _P:
        __slots__ = ("n",)

        def __init__(self):
            self.n = 0

    def step(o, d, i):
        o.n += i
        d[i & 255] = o.n

    def probe() -> int:
        o, d = _P(), {}
        t0 = time.perf_counter_ns()
        for i in range(200_000):
            step(o, d, i)
        return (time.perf_counter_ns() - t0) // 200_000

    best = min(probe() for _ in range(5))
    return {"version": sys.version.split()[0], "build": platform.python_build()[1],
            "compiler": platform.python_compiler(), "libpython": libpython, "probe_ns": best}


def _interp(info: dict) -> str:
    i = info.get("interpreter") or {}
    return f"built {i.get('build')}, {i.get('libpython')} libpython, probe {i.get('probe_ns')} ns"


def free_page_reporting() -> dict | None:
    """The guest kernel's free page reporting (a virtual machine handing freed memory back to its
    host), or None where it is not built in: its parameters as the kernel shows them.

    Where it is on, memory freed is taken back within seconds (measured on the 2-vCPU VM: 886 MB
    of a deleted 1-GB file within 10 s) and its next use costs a first touch again: 1 GB written
    into such pages cost 3.2 s of system time, into pages freed a moment before 0.23 s. The
    sidecar's spans file (~3.7 KB a call) is written into new page-cache pages, so the later part
    of a long run pays it (the worker's sustained-run profile: ``copy_folio_from_iter_atomic`` went
    from 3 % of its samples in seconds 5-25 to a third in seconds 50-70); Kamailio writes none."""
    base = Path("/sys/module/page_reporting/parameters")
    if not base.is_dir():
        return None
    out: dict = {}
    for f in sorted(base.iterdir()):
        try:
            out[f.name] = f.read_text().strip()
        except OSError:
            pass
    return out


def warm_page_cache(workdir: Path, mb: int) -> dict:
    """Write ``mb`` MB (at most a quarter of the available memory) to a scratch file in ``workdir``
    and delete it, twice, before anything is measured; the seconds of system time of each pass.

    Why: on a virtual machine the host backs a guest page only when the guest first touches it,
    and that first touch is charged to whoever touches it. The all-features sidecar writes its
    spans file (~4 KB a call: 160 MB in a 10-s step at 4000 calls/s, ~1 GB in the sustained run)
    into new page-cache pages; measured on a fresh 2-vCPU VM, writing 1 GB cost 2.7 s of system
    time the first time and 0.22 s every time after. Kamailio and the relay write no file, so on
    a fresh machine the ratios would carry a cost no long-running node pays. Pages freed by the
    deleted file are what the kernel hands out next, so the steps that follow write into warm
    pages (each step deletes its spans file)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    mb = max(0, min(mb, avail // 4)) if avail else 0
    out = {"mb": mb, "sys_s": []}
    block = b"\0" * (4 << 20)
    path = workdir / "page-cache-warm"
    for _ in range(2 if mb else 0):
        t0 = os.times()
        with open(path, "wb", buffering=0) as f:
            for _ in range(mb // 4):
                f.write(block)
        path.unlink()
        t1 = os.times()
        out["sys_s"].append(round(t1.system - t0.system, 2))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 3-s steps at 100,300 calls/s, fewer samples, 3-s profile")
    p.add_argument("--rates", help=f"ladder steps in calls/s (default {DEFAULT_RATES}; --quick 100,300)")
    p.add_argument("--duration", type=float, help="seconds per SIPp run (default 10, --quick 3)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma list of {', '.join(TARGETS)} (default: all; kamailio only when installed)")
    p.add_argument("--latency-rate", type=int, help="call rate of loaded_latency (default 1000, --quick 100)")
    p.add_argument("--sustained-rate", type=int, help="call rate of the sustained run (default 4000, --quick 100)")
    p.add_argument("--sustained-seconds", type=float, help="its length (default 75, --quick 5)")
    p.add_argument("--sustained-rounds", type=int, help="paired runs of it, alternating (default 3, --quick 1)")
    p.add_argument("--profile-rate", type=int, help="call rate of the profile (default 1000, --quick 100)")
    p.add_argument("--profile-seconds", type=int, help="py-spy -d (default 10, --quick 2)")
    p.add_argument("--retries", type=int,
                   help="ladder: runs of a failing step before a target stops (default 1 more; --quick 0)")
    p.add_argument("--budget", type=float, default=3000,
                   help="seconds: no new SIPp run starts after this much of the run (default 3000: the full "
                        "run took 1878-2088 s on a 2-vCPU AMD EPYC host, where the capped ladders climb "
                        "from 500 calls/s, before the 75-s run had three rounds (~6 min more); the margin "
                        "is for slower hosts)")
    p.add_argument("--repeat", type=int, default=1,
                   help="throughput section: SIPp runs per rate and target, medians reported (default 1)")
    p.add_argument("--tracing-rate", type=int, help="tracing section's call rate (default: first rate)")
    p.add_argument("--build", choices=("mypyc", "pure"), default="mypyc",
                   help="the sidecar the SIPp sections run: the mypyc build (what the image ships; "
                        "default, pure Python when it cannot be built) or pure Python")
    p.add_argument("--warm-mb", type=int,
                   help="MB written and deleted before the SIPp sections so that the spans files land in "
                        "pages the machine has touched before (default 2048, --quick 256; 0: none)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})")
    a = p.parse_args(argv)
    if a.rates is None:
        a.rates = "100,300" if a.quick else DEFAULT_RATES
    try:
        a.rates = [int(x) for x in a.rates.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rates: not a list of integers: {a.rates!r}")
    if not a.rates or any(r <= 0 for r in a.rates):
        p.error("--rates: give one or more positive call rates")
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.only if x not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(bad)}")
    a.targets = [x.strip() for x in a.targets.split(",") if x.strip()]
    bad = [x for x in a.targets if x not in TARGETS]
    if bad or not a.targets:
        p.error(f"--targets: unknown target(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    a.targets = [k for k in TARGETS if k in a.targets]
    if a.duration is None:
        a.duration = 3.0 if a.quick else 10.0
    if not 1 <= a.duration <= 600:
        p.error("--duration: 1..600 seconds")
    if a.retries is None:
        a.retries = 0 if a.quick else 1
    if a.latency_rate is None:
        a.latency_rate = 100 if a.quick else 1000
    if a.profile_rate is None:
        a.profile_rate = 100 if a.quick else 1000
    if a.sustained_rate is None:
        a.sustained_rate = 100 if a.quick else 4000
    if a.sustained_seconds is None:
        a.sustained_seconds = 5.0 if a.quick else 75.0
    if a.sustained_rounds is None:
        a.sustained_rounds = 1 if a.quick else 3
    if a.profile_seconds is None:
        a.profile_seconds = 2 if a.quick else 10
    if a.tracing_rate is None:
        a.tracing_rate = a.rates[0]
    if a.warm_mb is None:
        a.warm_mb = 256 if a.quick else 2048
    return a


def sidecar_build(wanted: str) -> str:
    """Compile the per-datagram modules (tests/compiled.py) and have every sidecar started from
    here run that build (SIPWATCH_TREE, read by the harness). Returns the build in use."""
    os.environ.pop("SIPWATCH_TREE", None)
    if wanted == "mypyc":
        try:
            import compiled
            tree = compiled.build()
        except Exception as exc:  # noqa: BLE001 - no compiler or mypy here: measure pure Python
            print(f"sidecar build: pure Python (the mypyc build failed: {str(exc)[:300]})")
            return "pure"
        os.environ["SIPWATCH_TREE"] = str(tree)
        print(f"sidecar build: mypyc ({', '.join(compiled.config()['modules'])} compiled)")
        return "mypyc"
    print("sidecar build: pure Python (--build pure)")
    return "pure"


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # unwind, so every process started is stopped
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted)
    info = machine()
    print(f"sipwatch bench: {info['cpus']} CPUs, load {' '.join(f'{x:.2f}' for x in info['loadavg'])}, "
          f"Python {info['python']} ({_interp(info)}), uvloop {info['uvloop']}, {info['sipp'] or 'no SIPp'}, "
          f"{info['kamailio'] or 'Kamailio not installed (apt-get install kamailio to add it as a baseline)'}"
          f"{' [quick]' if a.quick else ''}")
    g = info.get("git") or {}
    if g.get("commit"):
        print(f"sipwatch at {g['commit']}" + (f" + uncommitted changes in {', '.join(g['sipwatch_uncommitted'])}"
                                              if g.get("sipwatch_uncommitted") else ""))
    result: dict = {"machine": info, "args": {"quick": a.quick, "rates": a.rates, "duration": a.duration,
                                              "repeat": a.repeat, "only": a.only}}
    result["build"] = sidecar_build(a.build)
    t0 = time.monotonic()
    global BUDGET
    BUDGET = Budget(a.budget)
    keys = available_targets(a.targets)
    result["args"]["targets"] = keys
    sipp_sections = [x for x in ("ladder", "overload", "loaded_latency", "sustained", "profile", "throughput",
                                 "tracing", "hep", "tcp") if x in a.only]
    with tempfile.TemporaryDirectory(prefix="sipwatch-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        features = None
        if any(x in a.only for x in ("ladder", "overload", "loaded_latency", "sustained", "profile")) and (
                "all" in keys or "profile" in a.only):
            collector = stack.enter_context(bench_net.OtlpCollector(workdir))
            features = Features(workdir, collector)
        if "micro" in a.only:
            result["micro"] = section_micro(a.quick)
        if "pipeline" in a.only:
            _progress("pipeline ...")
            result["pipeline"] = section_pipeline(a.quick)
        if "analyze" in a.only:
            _progress("analyze vs tshark ...")
            result["analyze"] = bench_analyze.run(runs=1 if a.quick else 5)
        if "latency" in a.only:
            result["latency"] = section_latency(workdir, a.quick)
        if sipp_sections and not HAVE_SIPP:
            print(f"\n== {', '.join(sipp_sections)}: skipped (SIPp not installed: apt-get install sip-tester)")
        elif sipp_sections:
            if features is not None and a.warm_mb > 0:
                _progress("warming the page cache ...")
                w = result["page_cache_warm"] = warm_page_cache(workdir, a.warm_mb)
                if w["sys_s"]:
                    print(f"page cache: {w['mb']} MB written and deleted before the runs, "
                          f"{w['sys_s'][0]:.2f} s of system time, then {w['sys_s'][1]:.2f} s "
                          f"(first touches of new pages cost the writer; see warm_page_cache)")
                fpr = result["machine"].get("free_page_reporting")
                if fpr is not None:
                    print(f"free page reporting is on (order {fpr.get('page_reporting_order', '?')}): the host "
                          f"takes freed memory back within seconds, so the warm pages serve the first runs "
                          f"only; later spans-file pages cost a first touch again (see free_page_reporting)")
            if "ladder" in a.only:
                _progress("ladder ...")
                result["ladder"] = section_ladder(workdir, keys, a.rates, a.duration, features, a.retries)
                result["tracing_cost"] = tracing_cost(result["ladder"])
                if not a.quick and {"kamailio", "all"} <= set(keys):
                    _progress("floor steps again ...")
                    result["floor_runs"] = section_floor_runs(workdir, result["ladder"], a.duration, features)
            if "overload" in a.only:
                if result.get("ladder"):
                    _progress("overload ...")
                    result["overload"] = section_overload(workdir, keys, result["ladder"], a.duration, features)
                    if "all" in keys and not a.quick:
                        _progress("overload under a CPU limit ...")
                        result["capped_overload"] = section_capped_overload(workdir, a.duration, features)
                        if "kamailio" in keys:
                            result["capped_overload_kamailio"] = section_capped_kamailio(workdir, a.duration)
                else:
                    print("\n== overload: skipped (needs the ladder's highest passing rates: --only ladder,overload)")
            if "loaded_latency" in a.only:
                _progress("latency under load ...")
                result["loaded_latency"] = section_loaded_latency(
                    workdir, keys, a.latency_rate, a.duration, 300 if a.quick else 5000, features,
                    repeats=1 if a.quick else 3)
                section_residence(workdir, keys, a.latency_rate, 300 if a.quick else 2000, features,
                                  result["loaded_latency"], seconds=3.0 if a.quick else 6.0)
            if "sustained" in a.only:
                _progress("sustained ...")
                result["sustained"] = section_sustained(workdir, keys, a.sustained_rate, a.sustained_seconds,
                                                        features, a.sustained_rounds)
            if "profile" in a.only:
                _progress("profile ...")
                result["profile"] = section_profile(workdir, a.profile_rate, a.profile_seconds, features)
            if "hep" in a.only:
                _progress("HEP sender cost ...")
                import bench_hep
                result["hep"] = bench_hep.measure(workdir, rate=1000, duration=a.duration,
                                                  rounds=1 if a.quick else 2)
            if "tcp" in a.only:
                _progress("SIP over TCP vs Kamailio over TCP ...")
                import bench_tcp
                result["tcp"] = bench_tcp.measure(workdir, rate=1000, duration=a.duration,
                                                  rates=(300, 1000, 2000) if a.quick else (300, 1000, 2000, 3000, 4000, 5000, 6500),
                                                  log=_progress)
                t = result["tcp"]["targets"]
                def _past(v: dict) -> str:
                    p = v.get("twice_highest")
                    if not p:
                        return "–"
                    return (f"{p['goodput_pct_of_highest']}% goodput, {p['refused_503']} 503s, {p['failed']} failed, "
                            f"setup p50/p99 {_f(p['setup_p50_ms'])}/{_f(p['setup_p99_ms'])} ms")
                table("SIP over TCP (SIPp -t t1 both ends), 1000 calls/s",
                      ["target", "µs/msg", "CPU %", "highest passing calls/s", "offered 2× that"],
                      [[k, _f(v["us_per_msg"]), _f(v["cpu_pct"]), str(v["highest_passing_cps"]), _past(v)]
                       for k, v in t.items()],
                      f"  sidecar over UDP for reference: {_f(result['tcp']['sipwatch_udp_us_per_msg'])} µs/msg")
            if "throughput" in a.only:
                result["throughput"] = section_throughput(workdir, a.rates, a.duration, a.repeat)
            if "tracing" in a.only:
                result["tracing"] = section_tracing(workdir, a.tracing_rate, a.duration)
        if "flood" in a.only:
            result["flood"] = section_flood(workdir, a.quick)
        if features is not None:
            result["otlp_collector"] = features.collector.stats()
    if any(x in result for x in ("ladder", "overload", "loaded_latency", "sustained")):
        result["floors"] = floors(result)
    print_summary(result, keys, a.rates)
    result["budget_skipped"] = BUDGET.skipped
    if BUDGET.skipped:
        print(f"\n  time budget ({a.budget:.0f} s) spent: not run: {', '.join(BUDGET.skipped)}")
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    result["elapsed_s"] = time.monotonic() - t0
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in result['machine']['loadavg_after'])}; "
          f"{result['elapsed_s']:.0f} s")
    print(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

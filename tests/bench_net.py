"""Loopback load and latency helpers for the benchmark: the proxies under test (sidecar, bare
relay, optional Kamailio), a ping-pong latency probe, SIPp load runs and /proc accounting.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from harness import Sidecar, free_port, sipp_stat, stop_process

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KAMAILIO = shutil.which("kamailio")


# -- /proc accounting -------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    return sum(cpu_split(pids))


def cpu_split(pids) -> tuple[float, float, float, float]:
    """(user, system) seconds of the first of ``pids`` and (user, system) of the others together
    (its children: the sidecar's span worker, Kamailio's workers)."""
    out = [0, 0, 0, 0]
    for i, p in enumerate(pids):
        f = _stat_fields(p)
        if f:
            out[0 if i == 0 else 2] += int(f[11])
            out[1 if i == 0 else 3] += int(f[12])
    return out[0] / CLK_TCK, out[1] / CLK_TCK, out[2] / CLK_TCK, out[3] / CLK_TCK


def rss_peak_mb(pids) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def udp_rcvbuf_errors() -> int:
    """System-wide Udp RcvbufErrors from /proc/net/snmp."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["RcvbufErrors"])


def udp_port_drops(ports) -> int:
    """Sum of the ``drops`` column of every UDP socket bound to one of ``ports``."""
    want = {p for p in ports if p}
    total = 0
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if int(f[1].rsplit(":", 1)[1], 16) in want:
                total += int(f[-1])
    return total


# -- processes --------------------------------------------------------------------------------
class _Proc:
    """A helper subprocess that prints ``ready`` when it is listening."""

    name = "proc"

    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._out,
                                     stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log.read_text(errors='replace')[-2000:]}")
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        rest = b""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    rest, _ = self.proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc.stdout.close()
        if hasattr(self, "_out"):
            self._out.close()
        return (rest or b"").decode(errors="replace")


class Responder(_Proc):
    name = "responder"

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        super().__init__([sys.executable, str(HERE / "bench_peers.py"), "responder",
                          "--listen", f"127.0.0.1:{self.port}"], workdir / f"responder-{self.port}.log")


class Splitter(_Proc):
    """The upstream of a proxy under load while the latency probe runs: answers the probe's
    OPTIONS itself, passes everything else on to the SIPp callee at ``upstream_port``."""

    name = "splitter"

    def __init__(self, workdir: Path, upstream_port: int, port: int | None = None):
        self.port = port or free_port()
        super().__init__([sys.executable, str(HERE / "bench_peers.py"), "split",
                          "--listen", f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{upstream_port}"],
                         workdir / f"splitter-{self.port}.log")


class OtlpCollector(_Proc):
    """A local OTLP/HTTP trace collector in a process of its own (its CPU is charged to no proxy);
    ``stats()`` returns what it has decoded so far: requests, spans, bytes, bad_requests."""

    name = "otlp collector"

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, str(HERE / "bench_peers.py"), "otlp",
                          "--listen", f"127.0.0.1:{self.port}"], workdir / f"otlp-{self.port}.log")

    def stats(self) -> dict:
        import json
        import urllib.request
        with urllib.request.urlopen(f"{self.url}/stats", timeout=5) as r:
            return json.loads(r.read())


class Direct:
    """No proxy: clients talk to the upstream itself."""

    name = "direct"
    pid = None

    def __init__(self, workdir: Path, upstream_port: int):
        self.port = upstream_port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Relay(_Proc):
    name = "uvloop relay"

    def __init__(self, workdir: Path, upstream_port: int, use_asyncio: bool = False,
                 per_source: bool = False, name: str | None = None):
        self.port = free_port()
        if use_asyncio:
            self.name = "asyncio relay"
        if name:
            self.name = name
        super().__init__([sys.executable, str(HERE / "bench_peers.py"), "relay",
                          "--listen", f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{upstream_port}"]
                         + (["--asyncio"] if use_asyncio else []) + (["--per-source"] if per_source else []),
                         workdir / f"relay-{self.port}.log")


class SidecarTarget:
    """The real sidecar (``python -m sipwatch proxy``) via the test harness."""

    def __init__(self, workdir: Path, upstream_port: int, *extra: str, name: str = "sipwatch"):
        self.name = name
        self.sidecar = Sidecar(workdir, upstream_port, *extra)
        self.port = self.sidecar.port

    @property
    def pid(self) -> int:
        return self.sidecar.proc.pid

    def __enter__(self):
        try:
            self.sidecar.__enter__()
        except BaseException:
            self.sidecar.stop()  # started but never came up: do not leave it running
            raise
        return self

    def __exit__(self, *exc):
        self.sidecar.stop()


# what every Kamailio the tests and the bench start loads, and the request route they share: a
# stateless proxy that record-routes INVITEs; ``forward`` is the route's forwarding line(s)
KAMAILIO_MODULES = """loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "maxfwd.so"
loadmodule "rr.so"
loadmodule "siputils.so"
"""
_KAMAILIO_ROUTE = """request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
%s    if (has_totag()) {{
        loose_route();
    }} else if (method == "INVITE") {{
        record_route();
    }}
%s
    exit;
}}
"""


def kamailio_route(forward: str, first: str = "") -> str:
    """The shared request route (still a ``str.format`` template: braces doubled); ``first`` goes
    after the Max-Forwards check."""
    return _KAMAILIO_ROUTE % (first, forward)


_KAMAILIO_HEAD = """#!KAMAILIO
debug=-1
log_stderror=yes
children=1
auto_aliases=no
maxbuffer=4194304
listen=udp:127.0.0.1:{port}
mpath="{mpath}"
"""
KAMAILIO_CFG = _KAMAILIO_HEAD + KAMAILIO_MODULES + "\n" + kamailio_route('    forward("127.0.0.1", {upstream});')
# The same proxy refusing new INVITEs beyond {limit} a second with 503 + Retry-After, statelessly
# (the bench's overload comparison under a CPU limit: Kamailio has no shedding of its own, so its
# ratelimit module's TAILDROP pipe at a fixed rate stands in; sl absorbs the ACKs of its replies)
KAMAILIO_LIMITED_CFG = _KAMAILIO_HEAD + KAMAILIO_MODULES + """loadmodule "textops.so"
loadmodule "ratelimit.so"
modparam("ratelimit", "timer_interval", 1)
modparam("ratelimit", "pipe", "1:TAILDROP:{limit}")

""" + kamailio_route('    forward("127.0.0.1", {upstream});', """    if (is_method("INVITE") && !has_totag() && !rl_check("1")) {{
        append_to_reply("Retry-After: 5\\r\\n");
        sl_send_reply("503", "Service Unavailable");
        exit;
    }}
""")


def kamailio_modules() -> str | None:
    for d in ("/usr/lib/x86_64-linux-gnu/kamailio/modules", "/usr/lib/aarch64-linux-gnu/kamailio/modules",
              "/usr/lib/kamailio/modules", "/usr/local/lib64/kamailio/modules"):
        if os.path.exists(os.path.join(d, "rr.so")):
            return d
    return None


class Kamailio:
    """Kamailio as a stateless record-routing proxy, one UDP worker, f_malloc (``-x fm``)."""

    name = "kamailio"

    def __init__(self, workdir: Path, upstream_port: int, name: str | None = None, invite_limit: int | None = None):
        if name:
            self.name = name
        self.port = free_port()
        self.dir = workdir / f"kamailio-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "kamailio.cfg"
        cfg = KAMAILIO_CFG if invite_limit is None else KAMAILIO_LIMITED_CFG
        self.cfg.write_text(cfg.format(port=self.port, upstream=upstream_port, mpath=kamailio_modules(),
                                       limit=invite_limit))
        self.args = [KAMAILIO, "-f", str(self.cfg), "-DD", "-E", "-x", "fm", "-m", "64", "-M", "8",
                     "-Y", str(self.dir), "-P", str(self.dir / "pid"), "-w", str(self.dir)]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self):
        self._out = open(self.dir / "log.txt", "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited: {(self.dir / 'log.txt').read_text(errors='replace')[-2000:]}")
            if _probe(self.port):
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("kamailio did not answer")

    def __exit__(self, *exc):
        stop_process(self.proc)
        if hasattr(self, "_out"):
            self._out.close()


def _probe(port: int) -> bool:
    """True once something on ``port`` answers a Max-Forwards: 0 OPTIONS (483 from a proxy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        msg = options(s.getsockname()[1], port, 0, b"ready").replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
        s.sendto(msg, ("127.0.0.1", port))
        try:
            s.recvfrom(65535)
            return True
        except OSError:
            return False


def kamailio_version() -> str | None:
    if not KAMAILIO:
        return None
    try:
        out = subprocess.run([KAMAILIO, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].replace("version:", "").strip() if out else None


# -- OTLP receiver ----------------------------------------------------------------------------
class OtlpHttpReceiver:
    """A local OTLP/HTTP traces endpoint (``POST /v1/traces``) that counts what it is sent.

    Runs in a thread of the benchmark process, so its CPU is not charged to the sidecar."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        )
        recv = self
        self.requests = 0
        self.spans = 0
        self.bytes = 0
        ok_body = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                recv.requests += 1
                recv.bytes += len(body)
                recv.spans += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(ok_body)))
                self.end_headers()
                self.wfile.write(ok_body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import threading
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# -- latency probe ----------------------------------------------------------------------------
def options(cport: int, dport: int, i: int, nonce: bytes) -> bytes:
    return (
        b"OPTIONS sip:probe@127.0.0.1:%d SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK-%s-%d;rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:bench@127.0.0.1:%d>;tag=b%d\r\n"
        b"To: <sip:probe@127.0.0.1:%d>\r\n"
        b"Call-ID: probe-%d-%s@127.0.0.1\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"Contact: <sip:bench@127.0.0.1:%d>\r\n"
        b"Accept: application/sdp\r\n"
        b"Content-Length: 0\r\n\r\n"
    ) % (dport, cport, nonce, i, cport, i, dport, i, nonce, cport)


class PingPong:
    """One request outstanding at a time: send an OPTIONS, wait for its 200, repeat."""

    def __init__(self, timeout: float = 1.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.cport = self.sock.getsockname()[1]
        self.nonce = b"%x" % (os.getpid() ^ int(time.time() * 1000))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def run(self, port: int, n: int, deadline: float | None = None) -> tuple[list[float], int]:
        """Round trips in µs for ``n`` requests to 127.0.0.1:port (fewer when ``deadline``, a
        time.monotonic() value, passes first), and how many got no answer."""
        s, dest, clock = self.sock, ("127.0.0.1", port), time.perf_counter_ns
        rtts: list[float] = []
        lost = 0
        for i in range(n):
            if deadline is not None and i % 50 == 0 and time.monotonic() > deadline:
                break
            self.seq += 1
            msg = options(self.cport, port, self.seq, self.nonce)
            want = b"probe-%d-%s@" % (self.seq, self.nonce)
            t0 = clock()
            s.sendto(msg, dest)
            while True:
                try:
                    data = s.recv(65535)
                except OSError:
                    lost += 1
                    break
                if want in data:
                    rtts.append((clock() - t0) / 1000.0)
                    break  # a late answer to an earlier request is skipped
        return rtts, lost


class CpusHeldAwake:
    """Hold every CPU out of its idle states while in use: a PM QoS request of 0 µs wake-up latency
    (``/dev/cpu_dma_latency``, held for as long as the file is open; root only). On a VM whose idle
    vCPUs halt, a wake-up of a halted vCPU costs tens of µs and lands on whichever process the
    scheduler put on it, so the loaded ping-pong measures the guest's idle policy as much as the
    proxies; held awake, what is left is the proxies' own work and wake-ups. ``held``: the request
    is in force (False where it could not be made: not root, no such device)."""

    def __init__(self):
        self.fh = None
        self.held = False

    def __enter__(self) -> "CpusHeldAwake":
        try:
            self.fh = open("/dev/cpu_dma_latency", "wb", buffering=0)
            self.fh.write(struct.pack("i", 0))
            self.held = True
        except OSError:
            self.__exit__()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()  # (the request ends with the file)
            self.fh = None


def machine_ticks() -> tuple[int, int]:
    """(stolen, all) clock ticks of the whole machine so far (/proc/stat): the share of a step's
    ticks the hypervisor gave to someone else, which a guest's own CPU figures do not show."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (f[7] if len(f) > 7 else 0), sum(f[:8])


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total = after[1] - before[1]
    return None if total <= 0 else 100.0 * (after[0] - before[0]) / total


DUMPCAP = shutil.which("dumpcap")


class LoopbackCapture:
    """``dumpcap`` on the loopback interface for UDP to or from ``ports``. Its timestamps are the
    kernel's, taken as each datagram leaves its sender, so the gap between a datagram entering a
    proxy and the proxy's copy leaving it is the time the proxy held it: its wake-up and its work,
    without the probe's own wake-ups."""

    def __init__(self, path: Path, ports: list[int]):
        self.path = path
        self.filter = "udp and (" + " or ".join(f"port {p}" for p in ports) + ")"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LoopbackCapture":
        self.proc = subprocess.Popen([DUMPCAP, "-q", "-i", "lo", "-s", "4096", "-f", self.filter, "-w", str(self.path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not (self.path.exists() and self.path.stat().st_size) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dumpcap: {self.proc.stderr.read().decode(errors='replace')[-300:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # (the file header is written before the capture starts)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def probe_residence(path: Path, target_port: int, upstream_port: int) -> dict:
    """How long a proxy held each of the latency probe's OPTIONS and each 200 answering it, from a
    :class:`LoopbackCapture`: the request from its entering the proxy (sent to ``target_port``) to
    its copy leaving for ``upstream_port``; the response from its leaving the upstream to its copy
    leaving the proxy. Matched by the probe's Call-ID; a probe missing one of its four datagrams is
    left out (counted)."""
    sys.path.insert(0, str(HERE.parent))
    from capture.pcapfile import read_packets
    seen: dict[bytes, list[float | None]] = {}
    for p in read_packets(str(path)):
        i = p.payload.find(b"Call-ID: probe-")
        if i < 0:
            continue
        call_id = p.payload[i + 9:p.payload.find(b"@", i)]
        t = seen.setdefault(call_id, [None, None, None, None])
        if p.payload.startswith(b"OPTIONS "):
            if p.dst[1] == target_port:
                t[0] = p.ts  # into the proxy
            elif p.dst[1] == upstream_port:
                t[1] = p.ts  # its copy, out
        elif p.src[1] == upstream_port:
            t[2] = p.ts  # the 200, into the proxy
        elif p.src[1] == target_port:
            t[3] = p.ts  # its copy, out to the probe
    req, resp = [], []
    for t in seen.values():
        if None not in t:
            req.append((t[1] - t[0]) * 1e6)
            resp.append((t[3] - t[2]) * 1e6)
    out = {"probes": len(seen), "matched": len(req)}
    for name, xs in (("request", req), ("response", resp)):
        out.update({f"{name}_p50_us": percentile(xs, 50), f"{name}_p90_us": percentile(xs, 90),
                    f"{name}_p99_us": percentile(xs, 99)})
    return out


def cpu_share(cpu_s: float, duration: float, wall: float) -> float:
    """CPU % of a load run: its CPU seconds over the step's length, or over the run's own wall
    time when it went on longer."""
    return 100.0 * cpu_s / max(duration, wall)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return v[k]


def latency_probe(targets, n: int, warmup: int = 200, rounds: int = 5,
                  deadline: float | None = None) -> dict:
    """Interleaved ping-pong through each target (already running), ``n`` round trips each, or
    fewer when ``deadline`` (a time.monotonic() value) passes first: every target then still got
    the same number of rounds, so none is measured in a quieter moment than the others."""
    pp = PingPong()
    try:
        samples = {t.name: [] for t in targets}
        lost = {t.name: 0 for t in targets}
        sent = {t.name: 0 for t in targets}
        for t in targets:
            pp.run(t.port, warmup, deadline)
        per_round = max(1, n // rounds)
        for k in range(rounds):
            if deadline is not None and k and time.monotonic() > deadline:
                break
            for t in targets:
                r, l = pp.run(t.port, per_round)
                samples[t.name].extend(r)
                lost[t.name] += l
                sent[t.name] += len(r) + l
    finally:
        pp.close()
    out = {}
    for t in targets:
        s = samples[t.name]
        out[t.name] = {"sent": sent[t.name], "answered": len(s), "lost": lost[t.name],
                       "p50_us": percentile(s, 50), "p90_us": percentile(s, 90),
                       "p99_us": percentile(s, 99), "mean_us": sum(s) / len(s) if s else float("nan")}
    return out


# -- SIPp load --------------------------------------------------------------------------------
# The callee for load runs: the call flow of the test suite's uas_call without its traceparent
# checks, so the same callee serves direct calls, the relay, Kamailio and the sidecar.
BENCH_UAS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench callee">
  <recv request="INVITE" rrs="true"/>
  <send>
    <![CDATA[
      SIP/2.0 100 Trying
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_Record-Route:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_Record-Route:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv request="ACK" crlf="true"/>
  <recv request="BYE"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""
MSGS_PER_CALL = 7
SIPP_BUF = 4 << 20

# The caller for load runs: uac_call's flow (INVITE with SDP, 100/180, 200, ACK, BYE, 200) where a
# 503 to the INVITE is an expected answer that ends the call (ACK with the INVITE's branch, RFC 3261
# 17.1.1.3): a proxy shedding load refuses cleanly, it does not crash the call. The 503 must carry
# Retry-After, else SIPp counts the call as failed (FailedRegexpHdrNotFound). Per-message counts
# (-trace_counts) tell completed calls (the BYE's 200 received) from refused ones (503 received).
BENCH_UAC = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="bench caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=z9hG4bK-[pid]-[call_number]-inv
      From: "Caller" <sip:+493012345[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      Subject: sipwatch
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0 8
      a=rtpmap:0 PCMU/8000
      a=rtpmap:8 PCMA/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="503" optional="true" next="refused">
    <action>
      <ereg regexp=".*" search_in="hdr" header="Retry-After:" check_it="true" assign_to="retry_after"/>
    </action>
  </recv>
  <recv response="200" rrs="true"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: "Caller" <sip:+493012345[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: "Caller" <sip:+493012345[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true" next="done"/>
  <label id="refused"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=z9hG4bK-[pid]-[call_number]-inv
      From: "Caller" <sip:+493012345[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <label id="done"/>
  <Reference variables="retry_after"/>
</scenario>
"""


def _sipp(workdir: Path, tag: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    d = workdir / f"sipp-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    out = open(d / "stdout.txt", "wb")
    # 4 MiB socket buffers (SIPp's default is 64 KiB): on a busy 2-core box SIPp's own sockets
    # overflow in scheduling gaps long before the proxy under test does
    p = subprocess.Popen(["sipp", *args, "-nostdin", "-trace_err", "-trace_stat", "-fd", "1",
                          "-buff_size", str(SIPP_BUF)],
                         cwd=d, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    return p, d


def _int(stat: dict, key: str) -> int:
    try:
        return int(stat.get(key, 0))
    except ValueError:
        return 0


def _stop(p: subprocess.Popen, grace: float) -> None:
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGUSR1)  # SIPp: stop gracefully, dump statistics
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def sipp_counts(directory: Path) -> dict:
    """Last line of SIPp's -trace_counts CSV in ``directory`` as {column: int}."""
    files = sorted(directory.glob("*_counts.csv"))
    if not files:
        return {}
    lines = [ln for ln in files[-1].read_text().splitlines() if ln.strip()]
    head = lines[0].rstrip(";").split(";")
    last = lines[-1].rstrip(";").split(";")
    out = {}
    for k, v in zip(head, last):
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


def placement_seconds(directory: Path, calls: int) -> float | None:
    """Seconds SIPp took to place ``calls`` calls, from its -trace_stat rows (one a second):
    interpolated between the last row below ``calls`` placed and the first at or above it."""
    files = sorted(directory.glob("*_.csv"))
    if not files:
        return None
    lines = [ln for ln in files[-1].read_text().splitlines() if ln.strip()]
    if len(lines) < 2:
        return None
    head = lines[0].rstrip(";").split(";")
    try:
        i_start, i_now, i_out = (head.index(k) for k in ("StartTime", "CurrentTime", "OutgoingCall(C)"))
    except ValueError:
        return None
    prev = (0.0, 0)
    for ln in lines[1:]:
        f = ln.rstrip(";").split(";")
        try:
            t = float(f[i_now].split("\t")[-1]) - float(f[i_start].split("\t")[-1])
            n = int(f[i_out])
        except (ValueError, IndexError):
            continue
        if n >= calls:
            (t0, n0) = prev
            return t0 + (t - t0) * (calls - n0) / max(1, n - n0)
        prev = (t, n)
    return None


def call_outcomes(counts: dict) -> tuple[int, int]:
    """(completed, refused) from BENCH_UAC's message counts: the BYE's 200 (the last ``_200_Recv``
    column) and the ``503`` received."""
    ok200 = [k for k in counts if k.endswith("_200_Recv")]
    completed = counts[max(ok200, key=lambda k: int(k.split("_", 1)[0]))] if ok200 else 0
    refused = sum(v for k, v in counts.items() if k.endswith("_503_Recv"))
    return completed, refused


class SippLoad:
    """Calls at ``rate``/s for ``duration`` s, SIPp caller → target → SIPp callee; the target's CPU.

    ``start()`` starts both SIPp ends, ``finish()`` waits for the caller and returns the figures.
    ``upstream_port`` is where the target forwards to (the callee, or a Splitter in front of it).
    CPU is counted from the caller's start until ``settle`` seconds after it ended, and divided by
    the nominal ``duration``: all the work the run caused, per second of offered load (a run that
    stretches while SIPp waits for timeouts does not dilute it)."""

    def __init__(self, workdir: Path, target, uas_port: int, rate: int, duration: float,
                 settle: float = 1.0, uas_scenario: str = BENCH_UAS):
        self.workdir, self.target, self.uas_port = workdir, target, uas_port
        self.uas_scenario = uas_scenario
        self.rate, self.duration, self.settle = rate, duration, settle
        safe = "".join(c if c.isalnum() or c in "-." else "_" for c in target.name)
        self.tag = f"{safe}-{rate}-{int(time.time() * 1000) % 100000}"
        self.calls = max(1, int(rate * duration))
        self.uas = self.uac = None

    def start(self) -> "SippLoad":
        scen = self.workdir / f"bench_uas-{self.tag}.xml"
        scen.write_text(self.uas_scenario)
        uac_scen = self.workdir / "bench_uac.xml"
        if not uac_scen.exists():
            uac_scen.write_text(BENCH_UAC)
        self.uas, self.uas_dir = _sipp(self.workdir, f"uas-{self.tag}", [
            "-sf", str(scen), "-i", "127.0.0.1", "-p", str(self.uas_port), "-m", str(self.calls)])
        try:
            time.sleep(0.3)
            uac_port = free_port()
            target = self.target
            self.pids = tree_pids(target.pid) if target.pid else []
            self.proxy_port = target.port if target.pid else None
            self.ports = (self.uas_port, uac_port)
            self.rcvbuf0 = udp_rcvbuf_errors()
            self.drops0 = udp_port_drops([self.proxy_port]), udp_port_drops(self.ports)
            self.split0 = cpu_split(self.pids)
            self.cpu0 = sum(self.split0)
            self.ticks0 = machine_ticks()
            self.t0 = time.monotonic()
            self.uac, self.uac_dir = _sipp(self.workdir, f"uac-{self.tag}", [
                "-sf", str(uac_scen), "-i", "127.0.0.1", "-p", str(uac_port),
                "-m", str(self.calls), "-r", str(self.rate), "-recv_timeout", "10000", "-trace_counts",
                "-timeout", f"{int(self.duration + 30)}s", f"127.0.0.1:{target.port}"])
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        for p in (self.uac, self.uas):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def finish(self) -> dict:
        try:
            try:
                self.uac.wait(self.duration + 45)
            except subprocess.TimeoutExpired:
                _stop(self.uac, 0)
            wall = time.monotonic() - self.t0
            time.sleep(self.settle)  # work the run caused but done later (span export, housekeeping)
            split1 = cpu_split(self.pids)
            cpu1 = sum(split1)
            rss = rss_peak_mb(self.pids)
            drops1 = udp_port_drops([self.proxy_port]), udp_port_drops(self.ports)
            rcvbuf1 = udp_rcvbuf_errors()
            steal = steal_pct(self.ticks0, machine_ticks())
            _stop(self.uas, 2)
        finally:  # interrupted: leave no SIPp behind
            self.kill()
        uac_stat, uas_stat = sipp_stat(self.uac_dir), sipp_stat(self.uas_dir)
        completed, refused = call_outcomes(sipp_counts(self.uac_dir))
        created = _int(uac_stat, "OutgoingCall(C)")
        retrans = _int(uac_stat, "Retransmissions(C)") + _int(uas_stat, "Retransmissions(C)")
        msgs = MSGS_PER_CALL * completed + 2 * refused + retrans
        cpu = cpu1 - self.cpu0
        # goodput: completed calls per second of the time the calls were offered in (the step
        # length, or longer when SIPp could not place them that fast)
        placed_in = placement_seconds(self.uac_dir, created) if created else None
        offer_s = max(self.duration, placed_in or 0.0)
        pids, duration = self.pids, self.duration
        failed = max(0, self.calls - completed - refused)
        return {
            "failure_logs": keep_failure_logs(self.tag, (self.uac_dir, self.uas_dir)) if failed else None,
            "target": self.target.name, "rate": self.rate, "duration_s": duration, "calls": self.calls,
            "created": created, "completed": completed, "refused_503": refused,
            "failed": failed,
            "ok": _int(uac_stat, "SuccessfulCall(C)"), "sipp_failed": _int(uac_stat, "FailedCall(C)"),
            "retransmissions": retrans, "uac_rc": self.uac.returncode, "wall_s": wall,
            "placed_s": placed_in,
            "offered_cps": created / placed_in if created and placed_in else None,
            "goodput_cps": completed / offer_s,
            "cpu_s": cpu if pids else None,
            # (per second of the run as it went: a run SIPp could not place in time lasts longer
            # than the step, and its CPU over the step's length read 358% on 2 cores once)
            "cpu_pct": cpu_share(cpu, duration, wall) if pids else None,
            "cpu_us_per_msg": 1e6 * cpu / msgs if pids and msgs else None,
            # the same split: the target's first process and its children, user and system time
            "cpu_split_us_per_msg": dict(zip(("main_user", "main_sys", "children_user", "children_sys"),
                                             (1e6 * (b - a) / msgs for a, b in zip(self.split0, split1))))
            if pids and msgs else None,
            "rss_peak_mb": rss if pids else None,
            "proxy_drops": drops1[0] - self.drops0[0], "sipp_drops": drops1[1] - self.drops0[1],
            "rcvbuf_errors": rcvbuf1 - self.rcvbuf0, "steal_pct": steal,
        }


# where a load run that lost calls keeps SIPp's error logs (the run's own directory is temporary):
# which messages failed is the first question about such a run
FAILURE_LOGS = Path(__file__).resolve().parents[1] / "build" / "bench-failures"


def keep_failure_logs(tag: str, dirs) -> str | None:
    """Copy the ``*_errors.log`` of SIPp's ``dirs`` to FAILURE_LOGS/<tag>-<time>/; its path, or
    None when there was nothing to keep or it could not be written."""
    dest = FAILURE_LOGS / f"{tag}-{time.strftime('%Y%m%dT%H%M%S')}"
    kept = False
    try:
        for d in dirs:
            for log in Path(d).glob("*_errors.log"):
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, dest / f"{Path(d).name}-{log.name}")
                kept = True
    except OSError:
        return None
    return str(dest) if kept else None


def sipp_load(workdir: Path, target, uas_port: int, rate: int, duration: float,
              settle: float = 1.0) -> dict:
    """One load run (see SippLoad): start, wait, figures."""
    return SippLoad(workdir, target, uas_port, rate, duration, settle).start().finish()


def passed(run: dict, max_failed: float = 0.001) -> bool:
    """A load step passes when fewer than ``max_failed`` of its calls did not complete (a 503 is
    not a completed call)."""
    return run["calls"] > 0 and (run["calls"] - run["completed"]) / run["calls"] < max_failed


# -- profile ----------------------------------------------------------------------------------
PY_SPY = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                      os.environ.get("PATH", "")]))


class PySpy:
    """``py-spy record --pid P -d S -f raw --subprocesses`` in the background (blocking mode:
    --nonblocking reads torn stacks from a busy process)."""

    def __init__(self, workdir: Path, pid: int, seconds: int):
        self.out = workdir / f"py-spy-{pid}.txt"
        self.log = workdir / f"py-spy-{pid}.log"
        self.args = [PY_SPY, "record", "--pid", str(pid), "-d", str(seconds), "-f", "raw",
                     "--subprocesses", "-o", str(self.out)]
        self.seconds = seconds
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PySpy":
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def finish(self) -> tuple[str | None, str]:
        """(raw collapsed stacks or None, py-spy's own output)."""
        try:
            self.proc.wait(self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self._log.close()
        log = self.log.read_text(errors="replace")
        raw = self.out.read_text(errors="replace") if self.out.exists() else None
        return raw, log


def parse_collapsed(raw: str) -> tuple[int, list[list[str]], list[int]]:
    """py-spy's raw (collapsed) output: ``frame;frame;...;leaf COUNT`` per line → (total samples,
    stacks as frame lists root first, counts). Lines that do not end in a count are skipped."""
    stacks, counts = [], []
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        stacks.append(stack.split(";"))
        counts.append(int(n))
    return sum(counts), stacks, counts


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` → ``name (file.py)``: samples of one function, any line."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return f"{name} ({short})"


def profile_summary(raw: str, top: int = 10, own: str = "sipwatch/") -> dict:
    """Top ``top`` functions by self samples (the leaf frame) and the top functions of ``own``
    (frames whose file path contains it) by inclusive samples (counted once per stack)."""
    total, stacks, counts = parse_collapsed(raw)
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, n in zip(stacks, counts):
        frames = [f for f in frames if not f.startswith(("process ", "thread ("))] or frames
        leaf = _function(frames[-1])
        self_n[leaf] = self_n.get(leaf, 0) + n
        for fn in {_function(f) for f in frames if own in f}:
            incl[fn] = incl.get(fn, 0) + n
    def rank(d):
        return [{"function": k, "samples": v, "pct": 100.0 * v / total if total else 0.0}
                for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    return {"samples": total, "self": rank(self_n), "inclusive": rank(incl)}

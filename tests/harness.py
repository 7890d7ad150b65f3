"""Test helpers: free loopback ports, a sidecar subprocess, SIPp peers, metric scraping."""
from __future__ import annotations

import contextlib
import functools
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from sipwatch import demo

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "sipwatch" / "scenarios"
HAVE_SIPP = shutil.which("sipp") is not None


@functools.cache
def tshark_claimed_ports() -> frozenset[int]:
    """UDP and TCP ports tshark decodes as some other protocol by number (27950 is Quake 3,
    11211 memcache, ...). Port dissectors come before the SIP heuristic, so SIP on such a port
    is invisible to tshark: a test whose random port was one of them found 0 calls on its wire."""
    if not shutil.which("tshark"):
        return frozenset()
    out = subprocess.run(["tshark", "-G", "decodes"], capture_output=True, text=True, timeout=120).stdout
    return frozenset(int(f[1]) for f in (ln.split("\t") for ln in out.splitlines())
                     if len(f) >= 2 and f[0] in ("udp.port", "tcp.port") and f[1].isdigit())


@contextlib.contextmanager
def collector_off_traced():
    """The cyclic collector off and tracemalloc on for the block, as the proxy's collector policy
    has it between its rare deep collections: what a reference cycle holds stays held, and the
    block reads ``tracemalloc.get_traced_memory()`` to see it."""
    import gc
    import tracemalloc
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
        gc.enable()


def free_port() -> int:
    """A port free for UDP and TCP outside the ephemeral range (sipwatch.demo.free_port) that
    tshark reads as SIP when SIP runs on it (tshark is these tests' ground truth)."""
    claimed = tshark_claimed_ports()
    while True:
        port = demo.free_port()
        if port not in claimed:
            return port


def sipwatch_path() -> str:
    """PYTHONPATH for a sipwatch subprocess: the compiled build first when SIPWATCH_TREE names one
    (tests/compiled.py), then this checkout."""
    return os.pathsep.join(p for p in (os.environ.get("SIPWATCH_TREE"), str(ROOT)) if p)


def scrape(port: int, accept: str | None = None) -> dict:
    """Metrics at 127.0.0.1:port as {(sample_name, frozenset(labels)): value}."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of every sample called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@contextlib.contextmanager
def one_capture_clock():
    """While held, the kernel stamps each received packet once, on its way in, so two captures of
    the same packets (a live capture's dumpcap and the test's own, the ground truth) read the same
    time for it. Otherwise each packet socket reads the clock as the packet reaches it: beside two
    CPU hogs, 865 of 3,000 loopback packets differed by up to 10 µs between two dumpcaps (0 with
    this held), and on a loaded CI machine one packet's difference moved a stream's maximum
    jitter from tshark's 0.396 to 0.332 ms. Any socket asking for receive timestamps turns that
    stamping on (Linux: SO_TIMESTAMPNS, 35 where Python lacks the name)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
        yield
    finally:
        s.close()


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
    """Ask a child to stop with ``sig``, kill it if it has not exited after ``timeout``; reap it."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if sig in (signal.SIGTERM, signal.SIGINT):
                proc.send_signal(sig)  # a second signal cuts a sidecar's drain short
                try:
                    proc.wait(5)
                    return proc.returncode
                except subprocess.TimeoutExpired:
                    pass
            proc.kill()
            proc.wait()
    return proc.returncode


class Sidecar:
    """``python -m sipwatch proxy`` on loopback, stopped with SIGTERM."""

    def __init__(self, workdir: Path, upstream_port: int, *extra: str, env: dict | None = None,
                 pipe_stdout: bool = False):
        self.port = free_port()
        self.gw_metrics = free_port()
        self.sig_metrics = free_port()
        self.upstream_port = upstream_port
        self.workdir = workdir
        self.stdout_path = workdir / f"sidecar-{self.port}.log"
        self.args = [sys.executable, "-m", "sipwatch", "proxy",
                     "--listen", f"127.0.0.1:{self.port}",
                     "--upstream", f"127.0.0.1:{upstream_port}",
                     "--gateway-metrics", f"127.0.0.1:{self.gw_metrics}",
                     "--signaling-metrics", f"127.0.0.1:{self.sig_metrics}", *extra]
        self.env = {**os.environ, "PYTHONPATH": sipwatch_path(), **(env or {})}
        self.proc: subprocess.Popen | None = None
        # pipe_stdout: stdout on a pipe nobody reads until stop() (a stalled log reader);
        # what came through is then in stdout_bytes
        self.pipe_stdout = pipe_stdout
        self.stdout_bytes = b""

    def __enter__(self) -> "Sidecar":
        if self.pipe_stdout:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=self.env, cwd=self.workdir)
        else:
            self._out = open(self.stdout_path, "wb")
            self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.workdir)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.stdout_path.read_text()}")
            try:
                scrape(self.gw_metrics)
                return self
            except (OSError, http.client.HTTPException):  # not listening yet, or half up
                time.sleep(0.05)
        raise RuntimeError("sidecar did not come up")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        if self.pipe_stdout and self.proc is not None and self.proc.stdout is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.stdout_bytes += self.proc.communicate(timeout=30)[0] or b""
            except subprocess.TimeoutExpired:
                pass
        rc = stop_process(self.proc)
        if hasattr(self, "_out"):
            self._out.close()
        return rc

    def gateway(self) -> dict:
        return scrape(self.gw_metrics)

    def signaling(self) -> dict:
        return scrape(self.sig_metrics)

    def logs(self) -> list[dict]:
        out = []
        for line in self.stdout_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                out.append(orjson.loads(line))
        return out

    def wait_for(self, predicate, timeout: float = 10.0, side: str = "gateway"):
        """Poll a side's metrics until ``predicate(samples)`` is true; return the samples."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.gateway() if side == "gateway" else self.signaling()
            if predicate(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.1)


def sipp_stat(directory: Path) -> dict:
    """Last line of SIPp's -trace_stat CSV in ``directory`` as {column: value}."""
    files = sorted(directory.glob("*_.csv"))
    if not files:
        return {}
    lines = [ln for ln in files[-1].read_text().splitlines() if ln.strip()]
    head = lines[0].rstrip(";").split(";")
    last = lines[-1].rstrip(";").split(";")
    return dict(zip(head, last))


class Sipp:
    """One SIPp process on loopback, files kept in its own directory."""

    def __init__(self, workdir: Path, scenario: str, port: int, remote: int | None = None,
                 calls: int = 1, rate: float | None = None, *extra: str):
        self.dir = workdir / f"sipp-{scenario}-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        sf = SCENARIOS / f"{scenario}.xml"
        self.args = ["sipp", "-sf", str(sf), "-i", "127.0.0.1", "-p", str(port),
                     "-m", str(calls), "-nostdin", "-trace_err", "-trace_stat", "-fd", "1"]
        if rate is not None:
            self.args += ["-r", str(rate)]
        self.args += list(extra)
        if remote is not None:
            self.args.append(f"127.0.0.1:{remote}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sipp":
        self._out = open(self.dir / "stdout.txt", "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.dir, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = -9
        self._out.close()
        return rc

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stat(self) -> dict:
        return sipp_stat(self.dir)

    def errors(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.dir.glob("*_errors.log"))


def run_call_pair(workdir: Path, uac: str, uas: str, target_port: int, uas_port: int,
                  calls: int, rate: float = 20, uac_extra=(), uas_extra=(), timeout=90):
    """Start the callee, run the caller to completion; return (uac_rc, uas_rc, uac, uas)."""
    callee = Sipp(workdir, uas, uas_port, None, calls, None, *uas_extra).start()
    time.sleep(0.3)
    caller = Sipp(workdir, uac, free_port(), target_port, calls, rate, *uac_extra).start()
    try:
        uac_rc = caller.wait(timeout)
        uas_rc = callee.wait(15)
    finally:
        caller.kill()
        callee.kill()
    return uac_rc, uas_rc, caller, callee


def run_rtp_call_pair(workdir: Path, uas_port: int, uac_port: int, rtp_a: int, rtp_b: int,
                      calls: int, hold_ms: int, sender: list[str]):
    """SIPp calls with G.711 RTP from ``sender`` (capture/rtpsend.py and its options) between the
    SDP ports ``rtp_a`` (caller) and ``rtp_b`` (callee); returns (uac_rc, uas_rc, caller, callee)."""
    callee = Sipp(workdir, "uas_answer", uas_port, None, calls, None, "-mp", str(free_port()),
                  "-d", "10", "-set", "rtp_port", str(rtp_b)).start()
    time.sleep(0.3)
    caller = Sipp(workdir, "uac_call_rtp", uac_port, uas_port, calls, 10, "-mp", str(free_port()),
                  "-d", str(hold_ms), "-l", "1", "-set", "rtp_port", str(rtp_a),
                  "-set", "rtp_cmd", " ".join(sender)).start()
    try:
        uac_rc, uas_rc = caller.wait(60), callee.wait(15)
    finally:
        caller.kill()
        callee.kill()
    return uac_rc, uas_rc, caller, callee


"""``sipwatch analyze`` side by side with ``tshark -q -z sip,stat`` on one all-SIP capture.

``python -m tests.bench_analyze [--calls N] [--runs N] [--keep FILE]``. The capture is built
from the recorded SIPp fixtures in ``pcaps/`` (the SIP frames of each recorded call, its
Call-ID made unique per copy, copies started at a steady rate so a few hundred calls overlap,
as on a loaded link), so it is real SIPp traffic at a size worth timing, rebuilt on demand
instead of kept in the repository. Both tools run as whole processes (imports and start-up
included, as a user runs them: one untimed run first, so Python's bytecode cache is written as
an installed package has it, and both tools' files are in the page cache); CPU is user+sys of
the child from ``os.wait4``, runs alternate between the tools, and the median is reported,
because a shared 2-core machine gives noisy single figures.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pcapbuild as pb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# recorded SIP-only call patterns (UDP); each contributes its calls as templates
TEMPLATES = ("sidecar_call", "cancel_487", "register_401", "reject_486", "reject_503", "reinvite",
             "callee_bye", "options_keepalive", "invite_retransmit", "register_then_call")
DEFAULT_CALLS = 4180  # about 28,000 frames
CALL_INTERVAL = 0.005  # seconds between call starts: 200 calls/s
_CALL_ID = re.compile(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)")
LT_ETHERNET = 1


def _templates() -> list[list[tuple[float, bytes, bytes, int, int, bytes]]]:
    """Each recorded call as [(t from its first frame, src ip, dst ip, sport, dport, SIP)]."""
    out = []
    for name in TEMPLATES:
        lt, recs = pb.read_pcap((ROOT / "pcaps" / f"{name}.pcap").read_bytes())
        assert lt == LT_ETHERNET, name
        calls: dict[bytes, list] = {}
        for sec, usec, frame in recs:
            if frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ip = frame[14:]
            hl = (ip[0] & 15) * 4
            sport, dport = int.from_bytes(ip[hl:hl + 2], "big"), int.from_bytes(ip[hl + 2:hl + 4], "big")
            payload = ip[hl + 8:int.from_bytes(ip[2:4], "big")]
            m = _CALL_ID.search(payload)
            if m is None:
                continue
            calls.setdefault(m.group(1).strip(), []).append(
                (sec + usec / 1e6, ip[12:16], ip[16:20], sport, dport, payload))
        for cid, frames in calls.items():
            t0 = frames[0][0]
            out.append([(t - t0, s, d, sp, dp, p.replace(cid, b"%s")) for t, s, d, sp, dp, p in frames])
    return out


def build_capture(path: Path, calls: int = DEFAULT_CALLS) -> int:
    """Write the all-SIP capture; returns its frame count."""
    tpls = _templates()
    t_base = 1_764_547_200.0  # 2025-12-01 00:00 UTC
    frames = []
    for k in range(calls):
        tpl = tpls[k % len(tpls)]
        start = t_base + k * CALL_INTERVAL
        cid = b"load-%06d@sipwatch.bench" % k
        for t, s, d, sp, dp, p in tpl:
            sip = p.replace(b"%s", cid)
            frames.append((round(start + t, 6), pb.eth(pb.ipv4(_ip(s), _ip(d), 17, pb.udp(sp, dp, sip)))))
    frames.sort(key=lambda f: f[0])
    path.write_bytes(pb.pcap(LT_ETHERNET, frames))
    return len(frames)


def _ip(b: bytes) -> str:
    return ".".join(map(str, b))


def cpu_run(argv: list[str], env: dict | None = None) -> dict:
    """Run a whole process to its end: user+sys CPU (os.wait4), wall time, exit code, output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall, "rc": proc.returncode, "out": out}


def run(capture: Path | None = None, calls: int = DEFAULT_CALLS, runs: int = 5,
        python: str = sys.executable) -> dict:
    """Time both tools on the capture (built in a temporary directory when not given); returns
    the figures (median and best of ``runs`` each) and prints a table."""
    with tempfile.TemporaryDirectory(prefix="sipwatch-bench-analyze-") as tmp:
        if capture is None:
            capture = Path(tmp) / "all_sip.pcap"
            build_capture(capture, calls)
        # the compiled build first when the bench built one (SIPWATCH_TREE), as the sidecars run it;
        # -P: the working directory does not go before it on sys.path
        path = [p for p in (os.environ.get("SIPWATCH_TREE"), str(ROOT), os.environ.get("PYTHONPATH")) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        tools = {"sipwatch analyze": [python, "-P", "-m", "sipwatch.cli", "analyze", str(capture)]}
        if shutil.which("tshark"):
            tools["tshark -q -z sip,stat"] = ["tshark", "-q", "-z", "sip,stat", "-r", str(capture)]
        samples: dict[str, list[dict]] = {k: [] for k in tools}
        for k in range(runs + 1):  # the first round warms up (bytecode cache, page cache)
            for name, argv in tools.items():  # interleaved, so a burst of load elsewhere hits both
                r = cpu_run(argv, env)
                if r["rc"] != 0:
                    raise RuntimeError(f"{name} exited {r['rc']}")
                if k:
                    samples[name].append(r)
        frames = _frames(capture)
    res: dict = {"file_frames": frames, "runs": runs, "machine": machine(), "tools": {},
                 "build": "mypyc" if os.environ.get("SIPWATCH_TREE") else "pure"}
    for name, rs in samples.items():
        cpu = [r["cpu_s"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        res["tools"][name] = {"cpu_s_median": statistics.median(cpu), "cpu_s_best": min(cpu),
                              "wall_s_median": statistics.median(wall), "wall_s_best": min(wall),
                              "frames_per_cpu_s": frames / statistics.median(cpu)}
    ts = res["tools"].get("tshark -q -z sip,stat")
    sw = res["tools"]["sipwatch analyze"]
    res["cpu_ratio"] = sw["cpu_s_median"] / ts["cpu_s_median"] if ts else None
    res["at_most_tshark"] = None if ts is None else sw["cpu_s_median"] <= ts["cpu_s_median"]
    print_table(res)
    return res


def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    tshark = None
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "--version"], capture_output=True, text=True, timeout=30).stdout
        tshark = out.splitlines()[0] if out else None
    return {"cpus": os.cpu_count(), "cpu_model": model, "loadavg": list(os.getloadavg()),
            "python": sys.version.split()[0], "tshark": tshark}


def _frames(path: Path) -> int:
    from capture.pcapfile import read_packets

    counters: dict = {}
    for _ in read_packets(str(path), counters):
        pass
    return counters["frames"]


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"\n== analyze vs tshark: all-SIP capture of {res['file_frames']:,} frames, "
          f"whole processes, median of {res['runs']} (best); sipwatch's {res.get('build', 'pure')} build")
    print(f"  {m['cpus']} CPUs ({m['cpu_model']}), load {' '.join(f'{x:.2f}' for x in m['loadavg'])}, "
          f"Python {m['python']}, {m['tshark'] or 'no tshark'}")
    print(f"  {'':<24}{'CPU s':>15}{'wall s':>15}{'frames/CPU s':>14}")
    for name, t in res["tools"].items():
        print(f"  {name:<24}{t['cpu_s_median']:>8.3f} ({t['cpu_s_best']:.3f})"
              f"{t['wall_s_median']:>8.3f} ({t['wall_s_best']:.3f}){t['frames_per_cpu_s']:>14,.0f}")
    if res["cpu_ratio"] is None:
        print("  tshark not installed: no comparison")
    else:
        print(f"  sipwatch / tshark CPU: {res['cpu_ratio']:.2f}x "
              f"({'at most tshark' if res['at_most_tshark'] else 'slower than tshark'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench_analyze", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="calls in the built capture")
    p.add_argument("--runs", type=int, default=5, help="runs of each tool (median reported)")
    p.add_argument("--capture", type=Path, help="time this capture instead of building one")
    p.add_argument("--keep", type=Path, help="only write the built capture to this file")
    a = p.parse_args(argv)
    if a.keep is not None:
        print(f"{a.keep}: {build_capture(a.keep, a.calls)} frames")
        return 0
    run(a.capture, a.calls, a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

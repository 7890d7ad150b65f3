"""SIP over TCP through the sidecar against Kamailio over TCP, in the same run: CPU per forwarded
message at a fixed call rate, and the highest call rate that passes (fewer than 0.1% of calls not
completed), SIPp caller -> target -> SIPp callee, every hop over TCP (SIPp ``-t t1``: one
connection each way, as a gateway and a signaling server keep).

    python -m tests.bench_tcp [--rate 1000] [--duration 10] [--rates 300,1000,2000,3000,4000]

Kamailio is the stateless record-routing proxy of tests/bench_net.py listening on TCP (one TCP
worker, ``-x fm``); the sidecar runs ``--no-tracing`` with ``--upstream tcp:``. The last line
printed is the figures as JSON. ``measure()`` is the hook for ``make bench``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_net  # noqa: E402
from harness import free_port  # noqa: E402

KAMAILIO_TCP_CFG = """#!KAMAILIO
debug=-1
log_stderror=yes
children=1
tcp_children=1
auto_aliases=no
tcp_connection_lifetime=3605
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
mpath="{mpath}"
""" + bench_net.KAMAILIO_MODULES + "\n" + bench_net.kamailio_route(
    '    $du = "sip:127.0.0.1:{upstream};transport=tcp";\n    forward();')


class KamailioTcp(bench_net.Kamailio):
    """Kamailio forwarding over TCP (the UDP listener only answers the readiness probe)."""

    name = "kamailio-tcp"

    def __init__(self, workdir: Path, upstream_port: int):
        super().__init__(workdir, upstream_port, name="kamailio-tcp")
        self.cfg.write_text(KAMAILIO_TCP_CFG.format(port=self.port, upstream=upstream_port,
                                                    mpath=bench_net.kamailio_modules()))


class TcpSippLoad(bench_net.SippLoad):
    """bench_net's load run with both SIPp ends on TCP, one connection each (``-t t1``)."""

    def start(self) -> "TcpSippLoad":
        orig = bench_net._sipp
        bench_net._sipp = lambda workdir, tag, args: orig(workdir, tag, [*args, "-t", "t1"])
        try:
            return super().start()  # type: ignore[return-value]
        finally:
            bench_net._sipp = orig


def _target(workdir: Path, key: str, uas_port: int):
    if key == "kamailio":
        return KamailioTcp(workdir, uas_port)
    return bench_net.SidecarTarget(workdir, uas_port, "--no-tracing", "--upstream",
                                   f"tcp:127.0.0.1:{uas_port}", name="sipwatch-tcp")


class TimedTcpSippLoad(TcpSippLoad):
    """TcpSippLoad whose caller also times each call's setup (INVITE sent to its 200 received,
    SIPp ``rtd`` with ``-trace_rtt``): past the knee over TCP the question is how long admitted
    calls wait, since flow control slows the caller down instead of losing its messages."""

    def start(self) -> "TimedTcpSippLoad":
        (self.workdir / "bench_uac.xml").write_text(bench_net.BENCH_UAC.replace(
            '<recv response="200" rrs="true"/>', '<recv response="200" rrs="true" rtd="true"/>', 1))
        orig = bench_net._sipp
        bench_net._sipp = lambda workdir, tag, args: orig(
            workdir, tag, [*args, "-trace_rtt", "-rtt_freq", "1"] if tag.startswith("uac-") else args)
        try:
            return super().start()  # type: ignore[return-value]
        finally:
            bench_net._sipp = orig

    def finish(self) -> dict:
        out = super().finish()
        times = []
        for f in self.uac_dir.glob("*_rtt.csv"):  # Date_ms;response_time_ms;rtd_no
            for line in f.read_text().splitlines()[1:]:
                fields = line.split(";")
                try:
                    times.append(float(fields[1]))
                except (IndexError, ValueError):
                    pass
        times.sort()
        out["setup_ms"] = {"n": len(times), "p50": times[len(times) // 2] if times else None,
                           "p99": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None}
        return out


def run(workdir: Path, key: str, rate: int, duration: float, timed: bool = False) -> dict:
    uas_port = free_port()
    if key == "sipwatch-udp":  # the same sidecar and calls over UDP, for reference
        with bench_net.SidecarTarget(workdir, uas_port, "--no-tracing", name="sipwatch-udp") as target:
            return bench_net.SippLoad(workdir, target, uas_port, rate, duration).start().finish()
    with _target(workdir, key, uas_port) as target:
        if timed:  # (a directory of its own: the caller's scenario differs)
            sub = workdir / f"timed-{key}-{rate}"
            sub.mkdir(exist_ok=True)
            return TimedTcpSippLoad(sub, target, uas_port, rate, duration).start().finish()
        return TcpSippLoad(workdir, target, uas_port, rate, duration).start().finish()


def step_passed(step: dict) -> bool:
    """Fewer than 0.1% of the calls not completed, at (nearly) the rate asked: a step SIPp could
    not place at 97% of its rate measured the harness, not the target."""
    offered = step.get("offered_cps")
    return bench_net.passed(step) and (offered is None or offered >= 0.97 * step["rate"])


def measure(workdir: Path, rate: int = 1000, duration: float = 10.0,
            rates: tuple[int, ...] = (300, 1000, 2000, 3000, 4000), log=None, overload: bool = True) -> dict:
    """The TCP row: per target, CPU µs per message and CPU % at ``rate``, the highest of
    ``rates`` that passes (the ladder stops at the first failing step) and, with ``overload``,
    a step at twice that: goodput, 503s and call setup times (``twice_highest``)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    keys = ["sipwatch"] + (["kamailio"] if bench_net.KAMAILIO and bench_net.kamailio_modules() else [])
    out: dict = {"rate": rate, "duration_s": duration, "rates": list(rates), "targets": {}}
    ref = run(workdir, "sipwatch-udp", rate, duration)
    out["sipwatch_udp_us_per_msg"] = ref["cpu_us_per_msg"]
    log(f"  sipwatch  UDP at {rate}/s (reference): {ref['cpu_pct']:.1f}% CPU, {ref['cpu_us_per_msg']:.1f} µs/msg")
    for key in keys:
        fixed = run(workdir, key, rate, duration)
        log(f"  {key:9s} TCP at {rate}/s: {fixed['cpu_pct']:.1f}% CPU, {fixed['cpu_us_per_msg']:.1f} µs/msg, "
            f"{fixed['completed']}/{fixed['calls']} calls")
        best = None
        for r in rates:
            step = fixed if r == rate else run(workdir, key, r, duration)
            ok = step_passed(step)
            log(f"  {key:9s} TCP ladder {r}/s: {'pass' if ok else 'FAIL'} ({step['completed']}/{step['calls']}, "
                f"offered {step.get('offered_cps') or 0:.0f}/s, {step['cpu_pct'] or 0:.0f}% CPU)")
            if not ok:
                break
            best = r
        out["targets"][key] = {"cpu_pct": fixed["cpu_pct"], "us_per_msg": fixed["cpu_us_per_msg"],
                               "completed": fixed["completed"], "calls": fixed["calls"],
                               "highest_passing_cps": best}
        if best and overload:  # past the knee: twice the highest passing step
            step = run(workdir, key, 2 * best, duration, timed=True)
            setup = step["setup_ms"]
            past = {"offered_cps": step.get("offered_cps"), "goodput_cps": step["goodput_cps"],
                    "goodput_pct_of_highest": round(100.0 * step["goodput_cps"] / best, 1),
                    "refused_503": step["refused_503"], "failed": step["failed"],
                    "setup_p50_ms": setup["p50"], "setup_p99_ms": setup["p99"], "cpu_pct": step["cpu_pct"]}
            out["targets"][key]["twice_highest"] = past
            log(f"  {key:9s} TCP at 2x {best}/s: offered {past['offered_cps'] or 0:.0f}/s, goodput "
                f"{past['goodput_pct_of_highest']}% of {best}, {past['refused_503']} 503s, {past['failed']} failed, "
                f"setup p50 {setup['p50']} / p99 {setup['p99']} ms")
    t = out["targets"]
    if "kamailio" in t and t["kamailio"]["us_per_msg"] and t["sipwatch"]["us_per_msg"]:
        out["cpu_ratio_vs_kamailio"] = round(t["sipwatch"]["us_per_msg"] / t["kamailio"]["us_per_msg"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rates", default="300,1000,2000,3000,4000")
    args = ap.parse_args(argv)
    rates = tuple(int(x) for x in args.rates.split(",") if x)
    with tempfile.TemporaryDirectory(prefix="sipwatch-bench-tcp-") as d:
        out = measure(Path(d), args.rate, args.duration, rates)
    for key, v in out["targets"].items():
        print(f"{key:9s} over TCP: {v['us_per_msg'] and round(v['us_per_msg'], 1)} µs/msg at {out['rate']}/s "
              f"({v['cpu_pct'] and round(v['cpu_pct'], 1)}% CPU), highest passing {v['highest_passing_cps']} calls/s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

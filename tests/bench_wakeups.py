"""Where the loaded ping-pong's time goes between processes: every wake-up of the probe, the
splitter and the target while the probe runs, from the kernel's scheduler events (tracefs), by
where the woken process was put and how long it waited to run.

Why it exists: on a VM whose idle vCPUs halt, the added round trip of ``make bench`` is decided
less by either proxy's work than by its wake-ups. A wake-up onto the CPU the waker is about to
leave costs a few µs; one onto the other CPU costs the host's wake-up of a halted vCPU when that
CPU is idle (23-31 µs here) and a wait behind whatever runs there when it is not. How often each
happens depends on how busy everything keeps the CPUs, the target included: the reason the
bench also measures with every CPU held out of idle (``bench_net.CpusHeldAwake``).

``python tests/bench_wakeups.py [TARGET ...]`` (root, tracefs at /sys/kernel/tracing): for each
target (kamailio, relay, notrace, all) 1000 calls/s through it, the probe for ~2 s with the
scheduler events on, then a table: wakee, waker, placement (``same``: onto the waker's CPU;
``other-idle`` / ``other-busy``: onto the other CPU, idle or running something), count, p50 and
mean µs from the waker's ``sched_waking`` to the wakee's ``sched_switch`` in. A diagnostic, not a
section of ``make bench``: it needs root and changes the kernel's tracing state while it runs.
"""
from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_waking", "sched/sched_wakeup", "sched/sched_switch")
_LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


def classify(trace: str, roles: dict[int, str]) -> dict[tuple[str, str, str], list[float]]:
    """Wake-ups of the processes in ``roles`` (pid -> name) in a tracefs text trace: keyed by
    (wakee, waker, placement), the µs from ``sched_waking`` to the wakee's ``sched_switch`` in.
    A CPU is idle while its current task is the idle task (pid 0); a waker that is none of the
    roles is "other"."""
    current: dict[int, int] = {}  # cpu -> pid running there, from sched_switch
    waking: dict[int, tuple[float, int, str]] = {}  # wakee pid -> (ts, waker's cpu, waker role)
    placed: dict[int, tuple[float, str, str]] = {}  # wakee pid -> (ts of waking, waker role, placement)
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for line in trace.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        pid, cpu, ts, event = int(m.group(2)), int(m.group(3)), float(m.group(4)), m.group(5)
        fields = dict(_FIELD.findall(m.group(6)))
        if event == "sched_switch":
            nxt = int(fields.get("next_pid", -1))
            current[cpu] = nxt
            got = placed.pop(nxt, None)
            if got is not None:
                out[(roles[nxt], got[1], got[2])].append((ts - got[0]) * 1e6)
        elif event == "sched_waking":
            wakee = int(fields.get("pid", -1))
            if wakee in roles:
                waking[wakee] = (ts, cpu, roles.get(pid, "other"))
        elif event == "sched_wakeup":
            wakee = int(fields.get("pid", -1))
            w = waking.pop(wakee, None)
            if wakee in roles and w is not None:
                target = int(fields.get("target_cpu", -1))
                if target == w[1]:
                    where = "same"
                else:
                    where = "other-idle" if current.get(target, 0) == 0 else "other-busy"
                placed[wakee] = (w[0], w[2], where)
    return out


def _write(name: str, value: str) -> None:
    (TRACEFS / name).write_text(value)


def _traced(fn) -> str:
    """Run ``fn`` with the scheduler events on; the trace text."""
    _write("tracing_on", "0")
    _write("trace", "")
    _write("buffer_size_kb", "40000")
    for e in EVENTS:
        _write(f"events/{e}/enable", "1")
    try:
        _write("tracing_on", "1")
        fn()
    finally:
        _write("tracing_on", "0")
        for e in EVENTS:
            _write(f"events/{e}/enable", "0")
    text = (TRACEFS / "trace").read_text()
    _write("trace", "")
    return text


def measure(workdir: Path, key: str, features) -> tuple[dict, dict]:
    """1000 calls/s through ``key`` and the probe traced for ~2 s: (classified wake-ups, latency)."""
    import bench
    import bench_net
    uas = bench_net.free_port()
    with bench_net.Splitter(workdir, uas) as split:
        target = bench.make_target(workdir, key, split.port, features, per_source=True)
        with target:
            load = bench_net.SippLoad(workdir, target, uas, 1000, 8.0).start()
            try:
                time.sleep(2.0)
                roles = {p: "target" for p in bench_net.tree_pids(target.pid)}
                roles.update({split.pid: "split", os.getpid(): "probe"})
                lat: dict = {}
                trace = _traced(lambda: lat.update(bench_net.latency_probe(
                    [bench_net.Direct(workdir, split.port), target], 1000, warmup=50, rounds=4)))
            finally:
                load.finish()
    return classify(trace, roles), lat


def main(argv: list[str]) -> int:
    if not (TRACEFS / "trace").exists() or os.geteuid() != 0:
        print("needs root and tracefs at /sys/kernel/tracing")
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench
    import bench_net
    keys = argv or ["kamailio", "all"]
    bench.sidecar_build("mypyc")
    with tempfile.TemporaryDirectory(prefix="sipwatch-wakeups-") as tmp:
        workdir = Path(tmp)
        with bench_net.OtlpCollector(workdir) as collector:
            features = bench.Features(workdir, collector)
            for key in keys:
                got, lat = measure(workdir, key, features)
                through = [v for k, v in lat.items() if k != "direct"][0]
                print(f"\n== {bench.TARGETS[key]}: added p50 {through['p50_us'] - lat['direct']['p50_us']:+.1f} µs")
                print(f"{'wakee':8} {'waker':8} {'placement':11} {'n':>6} {'p50 µs':>8} {'mean µs':>8}")
                for (wakee, waker, where), xs in sorted(got.items()):
                    if len(xs) >= 20:
                        print(f"{wakee:8} {waker:8} {where:11} {len(xs):6d} {statistics.median(xs):8.1f} "
                              f"{statistics.mean(xs):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

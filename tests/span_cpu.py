"""Tracing cost through a real sidecar: CPU of the sidecar's process tree (from /proc) at a SIPp
call rate, ``--no-tracing`` against spans at 100 % exported over OTLP to a collector *and*
written to a spans file. Runs alternate (A B C A B C ...) so a shared machine's load falls on
all of them alike; medians are printed. With ``--latency``, also the round trip the sidecar
adds (OPTIONS ping-pong through it while it carries the call load, minus the same directly).

    python tests/span_cpu.py --rate 1000 --duration 10 --rounds 3 [--tree DIR] [--latency]

``--tree``: run the sidecar from another source tree (e.g. an older commit unpacked with
``git archive``). ``--base-tree DIR``: also run every traced configuration from DIR (``... @base``),
alternating with the others, to compare before and after in one sitting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_net  # noqa: E402
from harness import free_port, metric  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402


def run(workdir: Path, name: str, extra, rate: int, duration: float, tree: str | None, latency: bool) -> dict:
    """One SIPp load run through a fresh sidecar; with ``latency``, OPTIONS ping-pong through it
    (and to its upstream directly) while the calls run: a splitter in front of the SIPp callee
    answers the probes, as in the bench's loaded_latency section."""
    uas_port = free_port()
    with bench_net.Splitter(workdir, uas_port) as split:
        target = bench_net.SidecarTarget(workdir, split.port, *extra, name=name)
        if tree:
            target.sidecar.env["PYTHONPATH"] = tree
        with target:
            threads0 = thread_cpu(target.pid)
            kids0 = children_cpu(target.pid)
            load = bench_net.SippLoad(workdir, target, uas_port, rate, duration).start()
            lat = None
            try:
                if latency:
                    time.sleep(min(2.0, duration / 5))
                    direct = bench_net.Direct(workdir, split.port)
                    got = bench_net.latency_probe([direct, target], 3000, warmup=100, rounds=10,
                                                  deadline=load.t0 + duration - 0.5)
                    d, t = got["direct"], got[name]
                    lat = {"p50_us": t["p50_us"] - d["p50_us"], "p99_us": t["p99_us"] - d["p99_us"]}
            finally:
                r = load.finish()
            threads1 = thread_cpu(target.pid)
            main = [a - b for a, b in zip(threads1.get(target.pid, (0, 0)), threads0.get(target.pid, (0, 0)))]
            other = [sum(x[k] for x in threads1.values()) - sum(x[k] for x in threads0.values()) - main[k]
                     for k in (0, 1)]
            r["main_thread_cpu_s"], r["other_threads_cpu_s"] = sum(main), sum(other)
            r["main_thread_sys_s"], r["other_threads_sys_s"] = main[1], other[1]
            r["children_cpu_s"] = children_cpu(target.pid) - kids0  # the span worker process
            sig = target.sidecar.signaling()
            traced = "no-tracing" not in name
            r["spans_exported"] = metric(sig, "sipwatch_spans_exported_total") if traced else 0
            r["spans_dropped"] = metric(sig, "sipwatch_spans_dropped_total") if traced else 0
            r["latency"] = lat
    return r


def children_cpu(pid: int) -> float:
    """CPU seconds of the processes under ``pid`` (the span worker)."""
    return bench_net.cpu_seconds([p for p in bench_net.tree_pids(pid) if p != pid])


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of ``pid``, from /proc."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree")
    ap.add_argument("--base-tree")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--only", default="notrace,http,grpc")
    a = ap.parse_args()
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as d, bench_net.OtlpCollector(Path(d)) as col, OtlpReceiver() as rx:
        workdir = Path(d)
        configs = {
            "notrace": ("sipwatch --no-tracing", ("--no-tracing",)),
            "http": ("spans 100% OTLP/HTTP collector + file",
                     ("--otlp-endpoint", col.url, "--otlp-protocol", "http/protobuf",
                      "--spans-file", str(workdir / "spans-http.jsonl"), "--sample-ratio", "1")),
            "file": ("spans 100% file only", ("--spans-file", str(workdir / "spans-only.jsonl"), "--sample-ratio", "1")),
            "grpc": ("spans 100% OTLP/gRPC + file",
                     ("--otlp-endpoint", f"127.0.0.1:{rx.grpc_port}", "--otlp-protocol", "grpc",
                      "--spans-file", str(workdir / "spans-grpc.jsonl"), "--sample-ratio", "1")),
        }
        chosen = [configs[k] + (a.tree,) for k in a.only.split(",")]
        if a.base_tree:
            chosen += [(name + " @base", extra, a.base_tree) for name, extra, _ in chosen
                       if "no-tracing" not in name]
        for i in range(a.rounds):
            for name, extra, tree in chosen:
                r = run(workdir, name, extra, a.rate, a.duration, tree, a.latency)
                results.setdefault(name, []).append(r)
                print(f"round {i + 1} {name}: completed {r['completed']}/{r['calls']} cpu {r['cpu_pct']:.1f}% "
                      f"({r['cpu_us_per_msg']:.1f} µs/msg) spans exported {r['spans_exported']:.0f} "
                      f"dropped {r['spans_dropped']:.0f} loop thread {r['main_thread_cpu_s']:.2f} s "
                      f"(sys {r['main_thread_sys_s']:.2f}) other threads {r['other_threads_cpu_s']:.2f} s "
                      f"(sys {r['other_threads_sys_s']:.2f}) child processes {r['children_cpu_s']:.2f} s"
                      + (f" added rtt p50 {r['latency']['p50_us']:+.0f} µs p99 {r['latency']['p99_us']:+.0f} µs"
                         if r.get("latency") else ""), flush=True)
    base = statistics.median(r["cpu_s"] for r in results[chosen[0][0]])
    print(f"\nmedians at {a.rate} calls/s, {a.duration:g}-s runs, {a.rounds} rounds:")
    for name, rs in results.items():
        cpu = statistics.median(r["cpu_s"] for r in rs)
        loop = statistics.median(r["main_thread_cpu_s"] for r in rs)
        other = statistics.median(r["other_threads_cpu_s"] for r in rs)
        kids = statistics.median(r["children_cpu_s"] for r in rs)
        calls = statistics.median(r["completed"] for r in rs)
        print(f"  {name:40s} cpu {100 * cpu / a.duration:5.1f}%  {1e6 * cpu / max(1, calls):6.1f} µs/call  "
              f"x{cpu / base:.3f} of {chosen[0][0]}  (loop thread {loop:.2f} s, other threads {other:.2f} s, "
              f"child processes {kids:.2f} s)")


if __name__ == "__main__":
    main()

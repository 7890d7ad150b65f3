"""Paired runs of two builds of the sidecar: ``python -m tests.bench_ab REF_A REF_B [--cpu 1000,4000]
[--capped 2250,4500] [--tcp 1000,4000] [--latency] [--sustained 4000] [--rounds N]``.

On the 2-vCPU machines the same code's figures drift by tens of percent within an hour (the
capped goodput at 4500 calls/s offered: 1429-2640 calls/s in 35 runs), so a change is judged only
against its base measured in the same sitting, alternately (A B, B A, ...), several rounds, on
medians. Each ref (a commit, a branch, or ``.`` for the working tree) is checked out beside the
checkout and built as ``make bench`` runs it (``tests/compiled.py``: the mypyc modules and the C
extensions); every sidecar of an arm is started with that build first on its ``PYTHONPATH``
(``SIPWATCH_TREE``, read when the harness builds the sidecar's command, so it is set before each
step). The steps are ``tests.bench``'s own: ``load_step`` without a limit for ``--cpu`` (CPU
per message), under the 0.25-CPU limit for ``--capped``, ``_loaded_latency_once`` at 1000
calls/s for ``--latency``, ``tests.bench_tcp``'s run (``--no-tracing``, SIPp over TCP both ends) for
``--tcp``, ``load_step`` for 75 s without a limit for ``--sustained`` (the bench's
section of that name: past the linger of finished calls, with the CPU split into the proxy's and
the span worker's user and system time). A change to the per-message path is best counted first, in
instructions (``tests/bench_instr.py``): that figure does not drift.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402

import bench  # noqa: E402
import bench_net  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_ref(ref: str, workdir: Path, name: str) -> Path:
    """The compiled tree of ``ref`` (``.``: this checkout as it is), checked out as ``name``."""
    src = ROOT
    if ref != ".":
        src = workdir / f"src-{name}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(src), ref],
                       check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "tests.compiled"], cwd=src, check=True, capture_output=True,
                         text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def paired(arms: dict[str, Path], rounds: int, step) -> dict[str, list]:
    """``step(arm)`` for each arm, ``rounds`` times, the order reversed every other round, with
    the arm's build first on the sidecars' path; {arm: [results]}."""
    out: dict[str, list] = {name: [] for name in arms}
    names = list(arms)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            os.environ["SIPWATCH_TREE"] = str(arms[name])
            out[name].append(step(name))
    return out


def _values(results: dict[str, list], field: str) -> dict[str, list]:
    """{arm: [``field`` of each step that measured]} (a step that could not run gives None)."""
    return {arm: [r[field] for r in rs if r is not None and r.get(field) is not None]
            for arm, rs in results.items()}


def _medians(results: dict[str, list], field: str) -> dict[str, float | None]:
    return {arm: statistics.median(xs) if xs else None for arm, xs in _values(results, field).items()}


def _line(results: dict[str, list], field: str, fmt: str) -> str:
    """``A median M (r1 r2 ...)  B median ...`` of one figure."""
    medians = _medians(results, field)
    return "  ".join(f"{arm} median {'-' if medians[arm] is None else format(medians[arm], fmt)} ("
                     + " ".join(format(x, fmt) for x in xs) + ")" for arm, xs in _values(results, field).items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the base: a git ref, or . for the working tree")
    p.add_argument("b", help="the change")
    p.add_argument("--cpu", default="", help="comma list of calls/s: CPU per message, no limit")
    p.add_argument("--capped", default="", help="comma list of calls/s offered under the 0.25-CPU limit")
    p.add_argument("--tcp", default="", help="comma list of calls/s: CPU per message over TCP (bench_tcp)")
    p.add_argument("--latency", action="store_true", help="the added p50 at 1000 calls/s")
    p.add_argument("--sustained", type=int, default=0, help="calls/s held for --sustained-seconds (bench: 4000)")
    p.add_argument("--sustained-seconds", type=float, default=75.0)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args(argv)
    bench.BUDGET = bench.Budget(float("inf"))
    result: dict = {"a": a.a, "b": a.b, "rounds": a.rounds}
    try:
        _run(a, result)
    finally:  # (the refs' checkouts went with the temporary directory)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
    print(orjson.dumps(result, default=str).decode())
    return 0


def _run(a, result: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="sipwatch-ab-") as tmp, bench_net.OtlpCollector(Path(tmp)) as coll:
        workdir = Path(tmp)
        arms = {name: build_ref(ref, workdir, name) for name, ref in (("A", a.a), ("B", a.b))}
        features = bench.Features(workdir, coll)
        for rate in [int(x) for x in a.cpu.split(",") if x]:
            runs = paired(arms, a.rounds, lambda arm: bench.load_step(workdir, "all", rate, 10, features))
            _report(result, f"cpu_{rate}", "cpu_us_per_msg_median", runs, "cpu_us_per_msg", ".2f",
                    f"cpu @ {rate}/s, µs a message")
        for rate in [int(x) for x in a.capped.split(",") if x]:
            with bench.CpuCap(bench.CAP_CPU) as cap:
                if not cap.available:
                    print(f"capped: skipped ({cap.why})")
                    break
                runs = paired(arms, a.rounds, lambda arm: bench.load_step(
                    workdir, "all", rate, 10, features, cap))
            _report(result, f"capped_{rate}", "goodput_median", runs, "goodput_cps", ".0f",
                    f"capped @ {rate}/s, goodput calls/s")
        for rate in [int(x) for x in a.tcp.split(",") if x]:
            import bench_tcp
            runs = paired(arms, a.rounds, lambda arm: bench_tcp.run(workdir, "sipwatch", rate, 10))
            _report(result, f"tcp_{rate}", "cpu_us_per_msg_median", runs, "cpu_us_per_msg", ".2f",
                    f"TCP @ {rate}/s, µs a message")
            print(f"  completed: {_line(runs, 'completed', '.0f')}")
        if a.latency:
            runs = paired(arms, a.rounds, lambda arm: bench._loaded_latency_once(
                workdir, "all", 1000, 10, 3000, features))
            _report(result, "latency", "added_p50_median", runs, "added_p50_us", ".1f", "added p50 @ 1000/s, µs")
        if a.sustained:
            runs = paired(arms, a.rounds, lambda arm: _with_split(bench.load_step(
                workdir, "all", a.sustained, a.sustained_seconds, features)))
            label = f"sustained @ {a.sustained}/s for {a.sustained_seconds:g} s"
            _report(result, "sustained", "cpu_us_per_msg_median", runs, "cpu_us_per_msg", ".2f",
                    f"{label}, µs a message")
            for part in ("main_user", "main_sys", "children_user", "children_sys", "steal_pct"):
                print(f"  {part}: {_line(runs, part, '.2f')}")


def _with_split(r: dict | None) -> dict | None:
    """The step's result with its user/sys split (µs a message) lifted to the top level."""
    if r is not None:
        r.update(r.get("cpu_split_us_per_msg") or {})
    return r


def _report(result: dict, key: str, median_key: str, runs: dict[str, list], field: str, fmt: str,
            label: str) -> None:
    """One section's runs and the medians of ``field`` into ``result[key]``, and its printed line."""
    result[key] = {median_key: _medians(runs, field), "runs": runs}
    print(f"{label}: {_line(runs, field, fmt)}")

if __name__ == "__main__":
    sys.exit(main())

"""pymalloc's arenas on transparent huge pages (sipwatch/_hugeheap.c, sipwatch.heap): where the
arenas come from, what happens to freed ones, the fallback, and the proxy and span worker using
it (or not, with --no-huge-heap). The region is checked in /proc, the kernel's view, not in the
module's own counters alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT, Sidecar, free_port, sipwatch_path

hugeheap = pytest.importorskip("sipwatch._hugeheap")

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_possible() -> bool:
    try:
        return "[never]" not in THP.read_text()
    except OSError:
        return False


# run in a fresh interpreter: the allocator is installed once per process, for good
_PROBE = r"""
import json, sys
from sipwatch import _hugeheap

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def region_kb(field):
    start, size = _hugeheap.region()
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo >= start and hi <= start + size
        elif inside and line.startswith(field + ":"):
            total += int(line.split()[1])
    return total

out = {"installed": _hugeheap.install(int(sys.argv[1]))}
out["rss0"] = rss_mb()
x = [(i, str(i)) for i in range(1_000_000)]  # ~150 MB of small objects
out["alloc"] = dict(_hugeheap.stats(), rss=rss_mb(), region_rss_kb=region_kb("Rss"),
                    huge_kb=region_kb("AnonHugePages"))
del x
out["freed"] = dict(_hugeheap.stats(), rss=rss_mb(), region_rss_kb=region_kb("Rss"))
y = [(i, str(i)) for i in range(300_000)]
out["again"] = dict(_hugeheap.stats(), rss=rss_mb())
print(json.dumps(out))
"""


def _probe(reserve: int) -> dict:
    # (pymalloc even where the caller runs without it, as the sanitizer run does: its arenas are
    # what is tested)
    env = {**os.environ, "PYTHONPATH": sipwatch_path(), "PYTHONMALLOC": "pymalloc"}
    r = subprocess.run([sys.executable, "-c", _PROBE, str(reserve)], capture_output=True, text=True,
                       env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_arenas_come_from_the_region_freed_ones_are_reused_and_their_memory_returned():
    got = _probe(4 << 30)
    assert got["installed"] is True
    a, f, again = got["alloc"], got["freed"], got["again"]
    # ~150 MB of objects: well over a hundred 1-MiB arenas, all carved from the region, which the
    # kernel shows resident
    assert a["arena_size"] == 1 << 20
    assert a["carved_arenas"] >= 100 and a["fallback"] == 0
    assert a["region_rss_kb"] >= a["carved_arenas"] * 1024 * 0.9
    if _thp_possible():
        assert a["huge_kb"] > 0, "no transparent huge page in the region"
    # freed: all but KEEP_RESIDENT of the spare arenas gave their memory back, in the kernel's
    # count too
    assert f["spare"] >= 100
    assert f["released"] == f["spare"] - hugeheap.KEEP_RESIDENT
    assert f["region_rss_kb"] <= (hugeheap.KEEP_RESIDENT + 8) * 1024
    assert f["rss"] < a["rss"] - 100
    # allocating again takes the spare arenas: nothing new carved
    assert again["reused"] > 0
    assert again["carved_arenas"] == a["carved_arenas"]


def test_a_used_up_region_passes_arenas_on_to_cpythons_allocator():
    got = _probe(8 << 20)
    a = got["alloc"]
    assert got["installed"] is True and a["reserved"] == 8 << 20
    assert a["carved_arenas"] <= 8
    assert a["fallback"] >= 100  # the rest came from CPython's own allocator, and the program ran on


def test_use_huge_pages_without_the_c_module_changes_nothing(monkeypatch):
    from sipwatch import heap
    monkeypatch.setattr(heap, "_hugeheap", None)
    monkeypatch.setattr(heap, "_active", False)
    assert heap.use_huge_pages() is False and heap.active() is False and heap.stats() == {}


def test_the_flag_and_its_environment_variable():
    from sipwatch.config import settings_from
    base = ["--upstream", "127.0.0.1:5080"]
    assert settings_from(base, env={}).huge_heap is True
    assert settings_from(base + ["--no-huge-heap"], env={}).huge_heap is False
    assert settings_from(base, env={"SIPWATCH_NO_HUGE_HEAP": "1"}).huge_heap is False


def _region_mappings(pid: int) -> int:
    """Mappings of ``pid`` marked MADV_HUGEPAGE (``hg`` in smaps' VmFlags): the region is the
    only memory these processes so mark (it may show as two, carved and not yet carved)."""
    n = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("VmFlags:") and "hg" in line.split()[1:]:
            n += 1
    return n


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc (no pgrep: under the sanitizer run's
    LD_PRELOAD it hangs)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.parametrize("extra,expect", [((), 1), (("--no-huge-heap",), 0)])
def test_the_proxy_and_its_span_worker_use_the_region_unless_told_not_to(tmp_path, extra, expect):
    if os.environ.get("SIPWATCH_NO_C") == "1":  # (inherited by the sidecar: no C modules, CPython's arenas)
        expect = 0
    with Sidecar(tmp_path, free_port(), "--spans-file", str(tmp_path / "spans.jsonl"), *extra) as sc:
        pid = sc.proc.pid
        deadline = time.monotonic() + 20
        kids: list[int] = []
        while not kids and time.monotonic() < deadline:
            kids = _children(pid)
            time.sleep(0.1)
        assert kids, "no span worker"
        # the worker installs it when its configuration arrives: wait for that
        while _region_mappings(kids[0]) < expect and time.monotonic() < deadline:
            time.sleep(0.1)
        assert min(_region_mappings(pid), 1) == expect
        assert min(_region_mappings(kids[0]), 1) == expect
    started = [json.loads(line) for line in sc.stdout_path.read_text().splitlines()
               if '"started"' in line]
    assert started and started[0]["heap"] == ("huge pages" if expect else "plain")


def test_the_proxys_early_choice_reads_its_command_line_and_environment(monkeypatch):
    from sipwatch import heap
    calls = []
    monkeypatch.setattr(heap, "use_huge_pages", lambda: calls.append(1) or True)
    assert heap.early_choice(["proxy", "--upstream", "127.0.0.1:5080"], {}) is True
    assert heap.early_choice(["proxy", "--no-huge-heap"], {}) is False
    assert heap.early_choice(["proxy"], {"SIPWATCH_NO_HUGE_HEAP": " Yes "}) is False
    assert heap.early_choice(["proxy"], {"SIPWATCH_NO_HUGE_HEAP": "0"}) is True
    assert heap.early_choice(["analyze", "x.pcap"], {}) is False  # only the proxy
    assert heap.early_choice([], {}) is False
    assert len(calls) == 2


def test_sipwatch_no_c_keeps_cpythons_arenas():
    env = {**os.environ, "PYTHONPATH": sipwatch_path(), "SIPWATCH_NO_C": "1"}
    r = subprocess.run([sys.executable, "-c", "from sipwatch import heap; print(heap.use_huge_pages(), heap.stats())"],
                       capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["False", "{}"], r.stdout + r.stderr


def test_the_command_line_installs_it_before_reading_the_configuration():
    """The `sipwatch` command (the image's entry point) and `python -m sipwatch` both start in
    cli.main: the heap must be chosen there, before the proxy's modules are imported, so that their
    objects are on it. A configuration error stops before the proxy runs, so an install that waited
    for run_proxy leaves the modules read meanwhile outside the region."""
    if os.environ.get("SIPWATCH_NO_C") == "1":
        pytest.skip("SIPWATCH_NO_C=1: no C modules, no region")
    code = ("from sipwatch import cli, _hugeheap; rc = cli.main(['proxy', '--upstream', 'nonsense']); "
            "import sipwatch.config as c; start, size = _hugeheap.region(); "
            "print(rc, start <= id(c.settings_from) < start + size)")
    env = {**os.environ, "PYTHONPATH": sipwatch_path(), "PYTHONMALLOC": "pymalloc"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert r.stdout.split() == ["2", "True"], r.stdout + r.stderr

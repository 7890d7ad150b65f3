"""Instructions per message in the compiled core, counted by valgrind's callgrind:
``python -m tests.bench_instr [--calls N] [--options N] [--tree DIR]``.

Why it exists: on the 2-vCPU machines one 10-s run's CPU per message moves by ±20% and a
change of a few percent in the core drowns in that; the number of instructions the core runs for
the same messages does not move (the hash seed is fixed), so a change to the per-message path
can be judged on it in one run each, before the paired timed runs (``tests.bench_ab``) say
whether it shows live. It counts work, not time: a cache miss costs nothing here, so a change
that moves data around must still be timed.

Counted: every ``ProxyCore.receive_datagram`` of N whole calls (INVITE, 100, 180, 200, ACK,
BYE, 200: the bench's call flow, built as ``tests/bench_micro.py`` builds it) and, separately, of
N OPTIONS and their 200s (``bench_micro``'s rounds, the automatic collector off), on a fresh
core after a round of 500 not counted. Printed:
instructions per message, per response (its path: ``_fast_response``, else ``_response``) and per
request (the rest: parsing and ``_request``), and the JSON line. Needs valgrind and the mypyc
build (``tests/compiled.py``, built here when missing): the collection is switched on by the
compiled function's name.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENTRY = "CPyDef_core___ProxyCore___receive_datagram"
PARTS = {"request": "CPyDef_core___ProxyCore____request",
         "fast_response": "CPyDef_core___ProxyCore____fast_response",
         "response": "CPyDef_core___ProxyCore____response"}
WARM = 500


# -- inside valgrind --------------------------------------------------------------------------
def drive(kind: str, n: int) -> None:
    """``tests/bench_micro.py``'s round of WARM calls (or OPTIONS round trips), then, when ``n``, a
    round of ``n`` more on a fresh core: the same messages the micro-benchmark times."""
    import bench_micro as bm
    from sipwatch import core as core_module

    if not core_module.__file__.endswith(".so"):
        sys.exit(f"sipwatch.core is not the compiled build ({core_module.__file__})")
    run = bm._one_round if kind == "calls" else bm._options_round
    run(WARM, 0)
    if n:
        run(n, WARM)


# -- outside ----------------------------------------------------------------------------------
def count(tree: Path, kind: str, n: int, workdir: Path) -> dict:
    """Instructions under receive_datagram in the round of ``n`` of ``kind``, per message and per
    part (the warm-up round is counted too and taken out by running it alone as well)."""
    tree = Path(tree).resolve()  # (valgrind runs in the tree, with it on PYTHONPATH)
    per = {}
    for total in (WARM, WARM + n):
        out = workdir / f"cg.{kind}.{total}"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        f"--toggle-collect=*{ENTRY}*", sys.executable, str(HERE / "bench_instr.py"),
                        "--drive", kind, str(total - WARM)],
                       cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
                       check=True, capture_output=True)
        per[total] = _inclusive(out)
    msgs = 7 if kind == "calls" else 2
    requests = 3 if kind == "calls" else 1
    responses = msgs - requests
    base, full = per[WARM], per[WARM + n]
    diff = {k: full.get(k, 0) - base.get(k, 0) for k in full}
    # a response's part is its path's function; everything else (the parse of a request, the
    # entry's own work) goes to the requests
    resp = diff.get("fast_response", 0) + diff.get("response", 0)
    return {"n": n, "per_message": diff["total"] / (n * msgs),
            "per_request": (diff["total"] - resp) / (n * requests),
            "per_response": resp / (n * responses)}


def _inclusive(path: Path) -> dict:
    """Inclusive instruction counts of the entry and the parts, from callgrind_annotate."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
                          check=True, capture_output=True, text=True).stdout
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+\S*:(\w+)\s", line)
        if not m:
            continue
        value, fn = int(m.group(1).replace(",", "")), m.group(2)
        if fn == ENTRY:
            out["total"] = max(out.get("total", 0), value)
        for part, name in PARTS.items():
            if fn == name:
                out[part] = max(out.get(part, 0), value)
    if "total" not in out:
        raise RuntimeError(f"no {ENTRY} in {path}: is this the compiled build?")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench_instr", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="calls counted (7 messages each)")
    p.add_argument("--options", type=int, default=1000, help="OPTIONS round trips counted")
    p.add_argument("--tree", help="a compiled tree (default: tests/compiled.py builds this checkout's)")
    p.add_argument("--drive", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.drive:
        drive(a.drive[0], int(a.drive[1]))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        print("bench_instr: valgrind is not installed")
        return 2
    if a.tree:
        tree = Path(a.tree)
    else:
        sys.path.insert(0, str(ROOT))
        from tests import compiled
        tree = compiled.build()
    result = {"tree": str(tree)}
    with tempfile.TemporaryDirectory(prefix="sipwatch-instr-") as tmp:
        for kind, n in (("calls", a.calls), ("options", a.options)):
            if n > 0:
                r = result[kind] = count(tree, kind, n, Path(tmp))
                print(f"{kind}: {r['per_message']:.0f} instructions a message, {r['per_request']:.0f} a request, "
                      f"{r['per_response']:.0f} a response ({n} counted)", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

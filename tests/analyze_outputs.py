"""Every figure ``sipwatch analyze`` prints, kept for a byte-for-byte comparison across a change.

``python -m tests.analyze_outputs write DIR [CAPTURE...]`` runs ``sipwatch analyze`` (``--json`` and
the text view, each as its own process, with ``SIPWATCH_TREE`` first on the path when set, as the
bench runs it) over every capture in ``pcaps/`` and the shared captures next to the checkout (or the
ones named), and writes each output to DIR; ``compare DIR1 DIR2`` lists the outputs that differ
and exits 1 if any does. The run time in the JSON (``seconds``) is the one field blanked. A change
meant to make analyze faster must leave every output as it was: write before, write after,
compare.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "pcaps"
_SECONDS = re.compile(rb'\n  "seconds": [0-9.]+,')
_RATE = re.compile(rb"[0-9]+ packets/s")


def captures() -> list[Path]:
    own = sorted(p for p in (ROOT / "pcaps").rglob("*") if p.suffix in (".pcap", ".pcapng", ".cap"))
    shared = sorted(p for p in SHARED.glob("*") if p.suffix in (".pcap", ".pcapng", ".cap")) \
        if SHARED.is_dir() else []
    return own + shared


def write(out: Path, files: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = [p for p in (os.environ.get("SIPWATCH_TREE"), str(ROOT)) if p]
    # a fixed key: masked Call-IDs carry its hash, and outputs compare across runs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), SIPWATCH_SECRET="analyze-outputs")
    for f in files:
        name = _name(f)
        for mode, extra in (("json", ["--json"]), ("text", [])):
            r = subprocess.run([sys.executable, "-P", "-m", "sipwatch.cli", "analyze", str(f), *extra],
                               capture_output=True, env=env, timeout=600)
            data = _SECONDS.sub(b'\n  "seconds": 0,', r.stdout) if mode == "json" else r.stdout
            (out / f"{name}.{mode}").write_bytes(data + b"\n-- exit %d\n" % r.returncode
                                                 + _RATE.sub(b"N packets/s", r.stderr))


def _name(f: Path) -> str:
    """The output's file name: the capture's path below the checkout or the shared folder."""
    f = f.resolve()
    for base, tag in ((ROOT, ""), (SHARED.resolve(), "shared/")):
        if f.is_relative_to(base):
            return (tag + str(f.relative_to(base))).replace("/", "_")
    return f.name


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = [n for n in names if not (a / n).exists() or not (b / n).exists()
              or (a / n).read_bytes() != (b / n).read_bytes()]
    for n in differ:
        print(f"differs: {n}")
    print(f"{len(names)} outputs, {len(differ)} differ")
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "write":
        write(Path(argv[1]), [Path(p) for p in argv[2:]] or captures())
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""atheris (libFuzzer) entry point over the sans-IO core, the observer and the parser.

    python tests/fuzz/fuzz_core.py -seed=1 -runs=500 CORPUS_DIR tests/fuzz/seeds   # make test (fuzz-smoke)
    make fuzz                                                                   # 10 minutes, corpus kept

The properties are in target.py; a crash or a broken property writes the input to
``-artifact_prefix`` and exits non-zero. Copy such an input into tests/fuzz/regressions/ so that
pytest replays it from then on (tests/fuzz/test_fuzz_regressions.py).

``SIPWATCH_TREE=$(python -m tests.compiled)`` fuzzes the compiled build (what the image runs:
mypyc enforces annotations at run time). Its modules are not instrumented, so coverage guidance
comes from the target and the checker alone: start it from a corpus a run of the plain build kept.

``FUZZ_KEEP_GOING=DIR`` (what ``make fuzz`` sets) records each distinct finding once, as
DIR/<signature>.bin, and carries on (libFuzzer's -fork mode does not work with atheris); the
inputs run and the findings by signature are kept in DIR/summary.txt.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import sys
import time
import traceback

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if os.environ.get("SIPWATCH_TREE"):  # the compiled build (tests/compiled.py) ahead of this checkout
    sys.path.insert(0, os.environ["SIPWATCH_TREE"])

with atheris.instrument_imports(include=["sipwatch", "sipcheck", "target"]):
    import target

KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING")
_findings: dict[str, int] = {}
_runs = [0, time.monotonic()]


def signature(exc: BaseException) -> str:
    """Type, innermost frame and the message without its variable parts."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
    msg = str(exc).split("\n")[0]
    msg = re.sub(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"|\('[^)]*\)|\d+", "", msg)
    return f"{type(exc).__name__}@{where} {msg[:100]}".strip()


def test_one_input(data: bytes) -> None:
    _runs[0] += 1
    if not KEEP_GOING:
        target.run_one(data)
        return
    try:
        target.run_one(data)
    except Exception as exc:  # noqa: BLE001 - every finding is recorded, then the next input
        sig = signature(exc)
        n = _findings.get(sig, 0)
        _findings[sig] = n + 1
        _write_summary()
        if n == 0:
            name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", sig)[:100]
            digest = hashlib.sha1(data).hexdigest()[:10]
            with open(os.path.join(KEEP_GOING, f"{name}-{digest}.bin"), "wb") as f:
                f.write(data)
            print(f"\nFINDING {sig}", file=sys.stderr, flush=True)


def _summary_text() -> str:
    secs = time.monotonic() - _runs[1]
    lines = [f"fuzz summary: {_runs[0]} inputs in {secs:.0f} s ({_runs[0] / max(secs, 1e-9):.0f}/s), "
             f"{len(_findings)} distinct findings"]
    lines += [f"  {n:7d}  {sig}" for sig, n in sorted(_findings.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def _write_summary() -> None:
    """libFuzzer ends the process without running atexit handlers, so the tally is kept on disk
    (DIR/summary.txt) as it changes, and printed at exit when the exit is a normal one."""
    with open(os.path.join(KEEP_GOING, "summary.txt"), "w") as f:
        f.write(_summary_text())


def _summary() -> None:
    if KEEP_GOING:
        print("\n" + _summary_text(), file=sys.stderr)


def main() -> None:
    atexit.register(_summary)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

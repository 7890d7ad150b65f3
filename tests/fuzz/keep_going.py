"""``FUZZ_KEEP_GOING=DIR`` for the atheris entry points (what ``make fuzz`` sets): each distinct
finding is written once, as DIR/<signature>.bin, and the run carries on (libFuzzer's -fork mode
does not work with atheris); the inputs run and the findings by signature are kept in
DIR/summary.txt."""
from __future__ import annotations

import atexit
import hashlib
import os
import re
import sys
import time
import traceback
from typing import Callable


def signature(exc: BaseException) -> str:
    """Type, innermost frame and the message without its variable parts."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
    msg = str(exc).split("\n")[0]
    msg = re.sub(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"|\('[^)]*\)|\d+", "", msg)
    return f"{type(exc).__name__}@{where} {msg[:100]}".strip()


def entry(run_one: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """``run_one`` as libFuzzer's callback: as is without FUZZ_KEEP_GOING, else recording."""
    out = os.environ.get("FUZZ_KEEP_GOING")
    if not out:
        return run_one
    findings: dict[str, int] = {}
    runs = [0, time.monotonic()]

    def summary_text() -> str:
        secs = time.monotonic() - runs[1]
        lines = [f"fuzz summary: {runs[0]} inputs in {secs:.0f} s ({runs[0] / max(secs, 1e-9):.0f}/s), "
                 f"{len(findings)} distinct findings"]
        lines += [f"  {n:7d}  {sig}" for sig, n in sorted(findings.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines) + "\n"

    def one(data: bytes) -> None:
        runs[0] += 1
        try:
            run_one(data)
        except Exception as exc:  # noqa: BLE001 - every finding is recorded, then the next input
            sig = signature(exc)
            n = findings.get(sig, 0)
            findings[sig] = n + 1
            # libFuzzer ends the process without running atexit handlers: the tally is kept on
            # disk as it changes, and printed at exit when the exit is a normal one
            with open(os.path.join(out, "summary.txt"), "w") as f:
                f.write(summary_text())
            if n == 0:
                name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", sig)[:100]
                digest = hashlib.sha1(data).hexdigest()[:10]
                with open(os.path.join(out, f"{name}-{digest}.bin"), "wb") as f:
                    f.write(data)
                print(f"\nFINDING {sig}", file=sys.stderr, flush=True)

    atexit.register(lambda: print("\n" + summary_text(), file=sys.stderr))
    return one

"""atheris (libFuzzer) entry point over the sans-IO core, the observer and the parser.

    python tests/fuzz/fuzz_core.py -seed=1 -runs=500 CORPUS_DIR tests/fuzz/seeds   # make test (fuzz-smoke)
    make fuzz                                                                   # 10 minutes, corpus kept

The properties are in target.py; a crash or a broken property writes the input to
``-artifact_prefix`` and exits non-zero. Copy such an input into tests/fuzz/regressions/ so that
pytest replays it from then on (tests/fuzz/test_fuzz_regressions.py).

``SIPWATCH_TREE=$(python -m tests.compiled)`` fuzzes the compiled build (what the image runs:
mypyc enforces annotations at run time). Its modules are not instrumented, so coverage guidance
comes from the target and the checker alone: start it from a corpus a run of the plain build kept.

``FUZZ_KEEP_GOING=DIR`` (what ``make fuzz`` sets) records each distinct finding once and carries
on (keep_going.py).
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if os.environ.get("SIPWATCH_TREE"):  # the compiled build (tests/compiled.py) ahead of this checkout
    sys.path.insert(0, os.environ["SIPWATCH_TREE"])

with atheris.instrument_imports(include=["sipwatch", "sipcheck", "target"]):
    import target

import keep_going  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, keep_going.entry(target.run_one))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

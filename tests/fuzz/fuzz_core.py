"""atheris (libFuzzer) entry point over the sans-IO core, the observer and the parser.

    python tests/fuzz/fuzz_core.py -seed=1 -runs=3000 CORPUS_DIR tests/fuzz/seeds   # what make test runs
    make fuzz                                                                     # 10 minutes, corpus kept

The properties are in target.py; a crash or a broken property writes the input to
``-artifact_prefix`` and exits non-zero. Copy such an input into tests/fuzz/regressions/ so that
pytest replays it from then on (tests/fuzz/test_fuzz_regressions.py).
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["sipwatch", "sipcheck", "target"]):
    import target


def test_one_input(data: bytes) -> None:
    target.run_one(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

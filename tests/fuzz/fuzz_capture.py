"""atheris (libFuzzer) entry point over the capture reader and the analysis (properties in
capture_target.py).

    python tests/fuzz/fuzz_capture.py -seed=1 -runs=500 CORPUS_DIR tests/fuzz/capture_seeds   # make test
    make fuzz FUZZ_TARGET=capture                                                      # longer

``SIPWATCH_TREE=$(python -m tests.compiled)`` runs it over the compiled build's observer and parser
(what the image's ``sipwatch analyze`` and ``capture`` run; capture/ itself is not compiled).
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if os.environ.get("SIPWATCH_TREE"):  # the compiled build (tests/compiled.py): its observer and parser
    sys.path.insert(0, os.environ["SIPWATCH_TREE"])

with atheris.instrument_imports(include=["capture", "sipwatch.rtp", "sipwatch.observer", "capture_target"]):
    import capture_target

import keep_going  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, keep_going.entry(capture_target.run_one_capture))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

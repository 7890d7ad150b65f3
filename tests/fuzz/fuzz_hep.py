"""atheris (libFuzzer) entry point over the HEP decoder and receiver (properties in hep_target.py).

    python tests/fuzz/fuzz_hep.py -seed=1 -runs=500 CORPUS_DIR tests/fuzz/hep_seeds   # make test
    make fuzz FUZZ_TARGET=hep                                                        # longer, corpus kept
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["sipwatch", "capture", "hep_target"]):
    import hep_target

import keep_going  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, keep_going.entry(hep_target.run_one_hep))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

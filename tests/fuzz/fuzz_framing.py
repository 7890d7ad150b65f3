"""atheris (libFuzzer) entry point over the SIP-over-TCP framer (properties in framing_target.py).

    python tests/fuzz/fuzz_framing.py -seed=1 -runs=500 CORPUS_DIR tests/fuzz/framing_seeds   # make test
    make fuzz FUZZ_TARGET=framing                                                        # longer, corpus kept
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["sipwatch", "framing_target"]):
    import framing_target

import keep_going  # noqa: E402


def main() -> None:
    atheris.Setup(sys.argv, keep_going.entry(framing_target.run_one_framing))
    atheris.Fuzz()


if __name__ == "__main__":
    main()

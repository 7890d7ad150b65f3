"""Replay every fuzz seed and every saved finding through the fuzz target's properties
(tests/fuzz/target.py) without atheris: each input in seeds/ and regressions/ is one test.

A finding from ``make fuzz`` (a file in tests/fuzz/artifacts/) is kept by copying it into
regressions/ with a name saying what it broke."""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.target import run_one

HERE = Path(__file__).resolve().parent
INPUTS = sorted([*HERE.glob("seeds/*.bin"), *HERE.glob("regressions/*.bin")])


def test_there_are_inputs():
    assert len(INPUTS) >= 30


@pytest.mark.parametrize("path", INPUTS, ids=[f"{p.parent.name}/{p.stem}" for p in INPUTS])
def test_input_keeps_the_properties(path):
    run_one(path.read_bytes())

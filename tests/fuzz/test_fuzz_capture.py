"""Replay the capture fuzz seeds (tests/fuzz/capture_seeds, made by make_capture_seeds.py) and its
saved findings (capture_regressions/) through the capture target's properties without atheris."""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.capture_target import run_one_capture

HERE = Path(__file__).resolve().parent
INPUTS = sorted([*HERE.glob("capture_seeds/*.bin"), *HERE.glob("capture_regressions/*.bin")])


def test_there_are_inputs():
    assert len(INPUTS) >= 20


@pytest.mark.parametrize("path", INPUTS, ids=[f"{p.parent.name}/{p.stem}" for p in INPUTS])
def test_input_keeps_the_properties(path):
    run_one_capture(path.read_bytes())

"""Replay the framer's fuzz seeds (tests/fuzz/framing_seeds, made by make_framing_seeds.py)
through the framing target's properties without atheris."""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.framing_target import run_one_framing

HERE = Path(__file__).resolve().parent
INPUTS = sorted(HERE.glob("framing_seeds/*.bin"))


def test_there_are_inputs():
    assert len(INPUTS) >= 5


@pytest.mark.parametrize("path", INPUTS, ids=[p.stem for p in INPUTS])
def test_input_keeps_the_properties(path):
    run_one_framing(path.read_bytes())

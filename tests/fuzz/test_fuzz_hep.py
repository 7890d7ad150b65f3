"""Replay the HEP fuzz seeds (tests/fuzz/hep_seeds, made by make_hep_seeds.py) through the HEP
target's properties without atheris."""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.hep_target import run_one_hep

HERE = Path(__file__).resolve().parent
INPUTS = sorted(HERE.glob("hep_seeds/*.bin"))


def test_there_are_inputs():
    assert len(INPUTS) >= 5


@pytest.mark.parametrize("path", INPUTS, ids=[p.stem for p in INPUTS])
def test_input_keeps_the_properties(path):
    run_one_hep(path.read_bytes())

"""The small commands an operator or a probe runs (``sipwatch alive``, ``sipwatch mask-call-id``):
what they answer for files and settings that are stale, odd or wrong, run as the probe runs them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sipwatch", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60)


def test_alive_answers_by_the_files_age(tmp_path):
    f = tmp_path / "alive"
    f.touch()
    assert run("alive", str(f)).returncode == 0
    old = time.time() - 30
    os.utime(f, (old, old))
    r = run("alive", str(f))
    assert r.returncode == 1 and "last touched" in r.stderr


def test_alive_takes_a_time_far_ahead_of_the_clock_for_stale(tmp_path):
    """After the wall clock steps back an hour, a loop stuck since then left a time an hour
    ahead: it read as fresh (age below 0) until the clock caught up. A live loop touches the
    file again within a second."""
    f = tmp_path / "alive"
    f.touch()
    ahead = time.time() + 3600
    os.utime(f, (ahead, ahead))
    r = run("alive", str(f))
    assert r.returncode == 1 and "ahead of the clock" in r.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "x"])
def test_alive_refuses_a_max_age_that_is_no_number_of_seconds(tmp_path, value):
    """``--max-age nan`` answered alive for any age (every comparison with NaN is false)."""
    f = tmp_path / "alive"
    f.touch()
    r = run("alive", str(f), "--max-age", value)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--max-age" in r.stderr


def test_mask_call_id_refuses_an_unknown_mode_from_the_environment():
    """argparse checks a flag's choices, not a default taken from the environment: a bad
    SIPWATCH_MASK_CALL_ID ended in a ValueError traceback."""
    r = run("mask-call-id", "abc", env={"SIPWATCH_SECRET": "k", "SIPWATCH_MASK_CALL_ID": "bogus"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "SIPWATCH_MASK_CALL_ID" in r.stderr
    ok = run("mask-call-id", "abc", env={"SIPWATCH_SECRET": "k", "SIPWATCH_MASK_CALL_ID": "none"})
    assert ok.returncode == 0 and ok.stdout == "abc\n"


def test_mask_call_id_follows_the_sidecars_mask_numbers_none():
    """A sidecar run with SIPWATCH_MASK_NUMBERS=none logs Call-IDs as they are (its default
    --mask-call-id follows it); mask-call-id in the same environment showed them masked."""
    r = run("mask-call-id", "call-4915551234567@gw", env={"SIPWATCH_SECRET": "k", "SIPWATCH_MASK_NUMBERS": "none"})
    assert r.returncode == 0 and r.stdout == "call-4915551234567@gw\n"
    masked = run("mask-call-id", "call-4915551234567@gw", env={"SIPWATCH_SECRET": "k"})
    assert masked.returncode == 0 and "4915551234567" not in masked.stdout

"""The compiled build (mypyc; what the image runs) passes the core's tests as well.

mypyc compiles the per-datagram modules from the same typed source and enforces their annotations
at run time: a wrong annotation that pure Python never notices becomes a TypeError there, which
the core would count as an internal error and drop the datagram. So the in-process tests of the
core run again against the compiled tree (tests/compiled.py), and SIPp calls go through a compiled
sidecar. The C header scan (sipwatch/_sipscan.c) is built into the tree too and must be the one in
use there (the conftest guard checks it). Tests that patch the core at run time (``pure_python``) or trace its bytecode (the
adversarial-cost counts) only apply to pure Python and are left out here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiled import ROOT, build

CORE_TESTS = ["tests/test_core.py", "tests/test_hardening.py", "tests/test_state.py", "tests/test_hotpath.py",
              "tests/test_correlation.py", "tests/test_tcp_core.py", "tests/test_sipscan.py",
              "tests/test_response_fast.py", "tests/test_framing.py", "tests/test_fold_cost.py",
              # the refusals: the core's fast path, and the pump's own reading the compiled core's state
              "tests/test_refusal_fast.py", "tests/test_refusal_pump.py",
              # the call summary's modules (summary, masking, logs): their values and odd inputs
              "tests/test_housekeeping.py", "tests/test_handoff.py", "tests/test_timer_steps.py",
              "tests/test_masking.py::test_call_id_hash_is_hmac_blake2b_of_the_raw_call_id",
              "tests/test_masking.py::test_timestamps_of_log_lines",
              "tests/test_masking.py::test_log_lines_carry_no_character_a_terminal_would_act_on",
              "tests/test_masking.py::test_a_huge_value_is_masked_over_its_first_shown_max_characters_only",
              "tests/test_masking.py::test_plain_from_and_to_shapes_masked_as_the_rules_say",
              "tests/test_masking.py::test_a_callers_head_is_remembered_and_every_new_tag_masks_as_the_whole_value_does",
              "tests/test_mask_c.py",
              # the call summaries as the span worker writes them (compiled logs/summary there too)
              "tests/test_span_worker.py::test_the_worker_writes_the_call_summaries_the_proxy_would",
              "tests/test_span_worker.py::test_shared_stdout_gets_whole_lines_of_at_most_pipe_buf_per_write",
              "tests/test_gc.py::test_a_finished_call_lingering_in_the_proxy_takes_what_the_state_caps_are_sized_for",
              "tests/test_resilience.py::test_tick_survives_records_that_make_logging_raise_and_counts_them",
              "tests/test_resilience.py::test_tick_survives_a_timer_failure_and_a_failing_collector",
              # every fuzz seed and saved finding (a wrong annotation on a hostile path shows here first)
              "tests/fuzz/test_fuzz_regressions.py", "tests/fuzz/test_fuzz_hep.py", "tests/fuzz/test_fuzz_framing.py",
              "tests/fuzz/test_fuzz_capture.py", "tests/test_capture_bounds.py"]
SIPP_TESTS = ["tests/test_proxy_sipp.py", "tests/test_b2bua_sipp.py"]
# the lossy-caller run (40 s of SIPp retransmission timers) exercises no core path the others miss
SIPP_DESELECT = ["--deselect", "tests/test_proxy_sipp.py::test_lossy_caller_retransmissions_are_forwarded_and_counted"]


pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def tree():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler for mypyc")
    try:
        import mypyc  # noqa: F401
    except ImportError:
        pytest.skip("needs mypy (mypyc), in the test extra")
    return build()


def run_against(tree, files: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}", "SIPWATCH_TREE": str(tree),
           "SIPWATCH_EXPECT_COMPILED": "1"}
    # -P: the working directory (this checkout, pure Python) does not go first on sys.path
    return subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "not pure_python", *files], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_core_tests_pass_against_the_compiled_build(tree):
    r = run_against(tree, CORE_TESTS, 600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.strip().splitlines()[-1]


@pytest.mark.sipp
def test_sipp_calls_through_a_compiled_sidecar(tree):
    if shutil.which("sipp") is None:
        pytest.skip("needs SIPp")
    r = run_against(tree, [*SIPP_DESELECT, *SIPP_TESTS], 900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.strip().splitlines()[-1]


def test_instructions_are_counted_per_message_of_the_compiled_core(tree, tmp_path):
    """tests/bench_instr.py on the compiled tree: a forwarded request costs the core more than a
    response it relays (the request is parsed into lines, gets our Via, a trace header, a
    transaction and, for an INVITE, a call; the common response is one C call on the datagram),
    and counting the same again gives the same figure (the hash seed is fixed: the point of
    counting instead of timing). On a tree that is not compiled it refuses to count."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        pytest.skip("needs valgrind")
    import bench_instr
    r = bench_instr.count(tree, "calls", 30, tmp_path)
    assert r["per_request"] > 1.5 * r["per_response"] > 0
    assert r["per_message"] == pytest.approx((3 * r["per_request"] + 4 * r["per_response"]) / 7)
    again = bench_instr.count(Path(os.path.relpath(tree)), "calls", 30, tmp_path)  # (as --tree DIR may name it)
    assert again["per_message"] == pytest.approx(r["per_message"], rel=0.02)
    with pytest.raises(subprocess.CalledProcessError):
        bench_instr.count(ROOT, "calls", 1, tmp_path)

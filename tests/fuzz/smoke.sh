#!/bin/sh
# The short fuzz run of `make test`: atheris over the core, fixed seed, fixed number of inputs,
# a throw-away corpus. A finding is written to tests/fuzz/artifacts/ and fails the run.
# usage: tests/fuzz/smoke.sh PYTHON RUNS
py=${1:-python3}; runs=${2:-500}
if ! "$py" -c "import atheris" 2>/dev/null; then
  echo "fuzz-smoke: atheris is not installed on this platform"
  [ -z "$SIPWATCH_REQUIRE_TOOLS" ]; exit $?
fi
mkdir -p tests/fuzz/artifacts
d=$(mktemp -d); mkdir "$d/corpus"
"$py" tests/fuzz/fuzz_core.py -seed=1 -runs="$runs" -print_final_stats=1 \
  -artifact_prefix=tests/fuzz/artifacts/ "$d/corpus" tests/fuzz/seeds >"$d/log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then grep '^stat::' "$d/log" | tr '\n' ' '; echo; else tail -40 "$d/log"; fi
if [ $rc -eq 0 ]; then  # the HEP decoder and receiver (tests/fuzz/hep_target.py)
  mkdir "$d/hep"
  "$py" tests/fuzz/fuzz_hep.py -seed=1 -runs="$runs" -print_final_stats=1 \
    -artifact_prefix=tests/fuzz/artifacts/ "$d/hep" tests/fuzz/hep_seeds >"$d/log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "hep: $(grep '^stat::' "$d/log" | tr '\n' ' ')"; else tail -40 "$d/log"; fi
fi
if [ $rc -eq 0 ]; then  # the SIP-over-TCP framer (tests/fuzz/framing_target.py)
  mkdir "$d/framing"
  "$py" tests/fuzz/fuzz_framing.py -seed=1 -runs="$runs" -print_final_stats=1 \
    -artifact_prefix=tests/fuzz/artifacts/ "$d/framing" tests/fuzz/framing_seeds >"$d/log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "framing: $(grep '^stat::' "$d/log" | tr '\n' ' ')"; else tail -40 "$d/log"; fi
fi
if [ $rc -eq 0 ]; then  # the capture reader and the analysis (tests/fuzz/capture_target.py)
  mkdir "$d/capture"
  "$py" tests/fuzz/fuzz_capture.py -seed=1 -runs="$runs" -print_final_stats=1 \
    -artifact_prefix=tests/fuzz/artifacts/ "$d/capture" tests/fuzz/capture_seeds >"$d/log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "capture: $(grep '^stat::' "$d/log" | tr '\n' ' ')"; else tail -40 "$d/log"; fi
fi
rm -rf "$d"
exit $rc

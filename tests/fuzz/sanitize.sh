#!/bin/sh
# The C extensions (sipwatch/_sipscan.c, _otlpenc.c, _udppump.c, _hepenc.c, _hugeheap.c) under AddressSanitizer and
# UndefinedBehaviorSanitizer: built into a throw-away copy of the package, which then goes first on
# PYTHONPATH (and SIPWATCH_TREE, so the sidecars the tests start load it too). The extensions read
# bytes straight off the network; a memory error a datagram can reach must abort the run.
# PYTHONMALLOC=malloc, or pymalloc's arenas hide overflows of Python objects.
# Reports go to files (pytest captures stderr, and an abort loses it); any report fails the run.
# usage: tests/fuzz/sanitize.sh PYTHON [PYTEST ARGS...]   (default: the C-facing tests)
set -u
py=${1:-python3}; [ $# -gt 0 ] && shift
# (a relative path, as the README's .venv/bin/python, must still work after the cd below)
case $py in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
if [ $# -eq 0 ]; then
  set -- tests/test_udppump.py tests/test_otlp_encode.py tests/test_otlpenc_values.py \
    tests/test_hardening.py tests/test_response_fast.py tests/test_refusal_fast.py tests/test_refusal_pump.py tests/test_sipscan.py tests/test_sipscan_values.py tests/test_fuzz_live.py \
    tests/test_hep_c.py tests/test_hep.py
fi
libasan=$(gcc -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "sanitize: no libasan (gcc with ASAN support is needed)"; exit 1; }
d=$(mktemp -d); mkdir "$d/tree" "$d/logs"
cp -r sipwatch "$d/tree/"
find "$d/tree" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g" \
LDFLAGS="-fsanitize=address,undefined" \
  "$py" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import compiled; compiled.build_c(Path(sys.argv[1]))" "$d/tree" \
  || { rm -rf "$d"; exit 1; }
here=$(pwd)
# the peers the tests start (tshark, capinfos, dumpcap, SIPp...) inherit LD_PRELOAD, and capinfos
# then hangs on a futex: they run through wrappers that drop it
mkdir "$d/bin"
for tool in tshark capinfos dumpcap editcap mergecap text2pcap sipp sngrep kamailio promtool; do
  p=$(command -v "$tool") || continue
  printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$@"\n' "$p" >"$d/bin/$tool"; chmod +x "$d/bin/$tool"
done
# checked from outside the checkout, where "sipwatch" can only import from the sanitized copy
check='import sys, sipwatch._sipscan as a, sipwatch._otlpenc as b, sipwatch._udppump as c, sipwatch._hepenc as d
bad = [m.__file__ for m in (a, b, c, d) if not m.__file__.startswith(sys.argv[1])]
sys.exit(f"not the sanitized build: {bad}" if bad else 0)'
# a small quarantine: the default 256 MB reads as growth to the RSS checks of tests/test_fuzz_live.py
export PATH="$d/bin:$PATH" LD_PRELOAD="$libasan" PYTHONMALLOC=malloc PYTHONPATH="$d/tree" SIPWATCH_TREE="$d/tree" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:quarantine_size_mb=16:log_path=$d/logs/asan" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$d/logs/ubsan"
(cd "$d" && "$py" -c "$check" "$d/tree/") || { rm -rf "$d"; exit 1; }
# -P: the checkout (where an editable install builds its own extensions) does not go first on
# sys.path, so the tests that call the extensions in process load the sanitized ones too
(cd "$here" && SIPWATCH_EXPECT_EXTENSIONS_FROM="$d/tree/" "$py" -P -m pytest -q -p no:cacheprovider "$@")
rc=$?
if [ -n "$(ls "$d/logs")" ]; then cat "$d/logs"/*; rc=1; fi
rm -rf "$d"
exit $rc

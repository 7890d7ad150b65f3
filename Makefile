# sipwatch: `make demo` runs real SIP calls through the sidecar; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench venv system-deps clean fuzz fuzz-smoke

# An existing venv keeps its interpreter: "python3 -m venv" over one made by another python points
# it at that python's library, and the venv's own binary then fails to import ssl.
$(BIN)/.installed: pyproject.toml setup.py sipwatch/_sipscan.c sipwatch/_otlpenc.c sipwatch/_udppump.c sipwatch/_hepenc.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

system-deps:
	.ci/install-system-deps

demo: system-deps venv
	$(BIN)/python -m sipwatch.demo $(DEMO_ARGS)

test: system-deps venv
	@# the mypyc build (over a minute) starts in the background; tests that need it wait for it
	@$(BIN)/python -m tests.compiled > /dev/null 2>&1 &
	$(BIN)/python -m ruff check sipwatch capture tests deploy
	@# the tests marked long (mostly waiting on timers, or on the build) run in a second pytest
	@# process beside the rest; its report follows the main one (exit 5: none selected)
	@mkdir -p build; rc=0; \
	$(BIN)/python -m pytest -q -p no:cacheprovider -m long $(PYTEST_ARGS) > build/long-tests.log 2>&1 & long=$$!; \
	sh tests/fuzz/smoke.sh $(BIN)/python $(FUZZ_RUNS) || rc=$$?; \
	$(BIN)/python -m pytest -q -m "not long" $(PYTEST_ARGS) || rc=$$?; \
	wait $$long; r=$$?; echo "== the tests marked long (run beside the rest):"; cat build/long-tests.log; \
	[ $$r -eq 0 ] || [ $$r -eq 5 ] || rc=$$r; exit $$rc

# atheris over the core (tests/fuzz): a fixed seed and a fixed number of inputs, a few seconds;
# a finding is written to tests/fuzz/artifacts/ and fails the target
FUZZ_RUNS ?= 500
fuzz-smoke: venv
	sh tests/fuzz/smoke.sh $(BIN)/python $(FUZZ_RUNS)

# longer coverage-guided run with a kept corpus (tests/fuzz/corpus, git-ignored); it keeps going
# after a finding, saves one input per distinct finding in tests/fuzz/artifacts/ and lists them.
# FUZZ_TARGET: core (the proxy core, observer and parser), capture (the capture reader and the
# analysis), hep (the HEP decoder and receiver) or framing (SIP over TCP)
FUZZ_TIME ?= 600
FUZZ_TARGET ?= core
FUZZ_SEEDS_core := tests/fuzz/seeds tests/fuzz/regressions
FUZZ_SEEDS_capture := tests/fuzz/capture_seeds tests/fuzz/capture_regressions
FUZZ_SEEDS_hep := tests/fuzz/hep_seeds
FUZZ_SEEDS_framing := tests/fuzz/framing_seeds
FUZZ_CORPUS := tests/fuzz/corpus$(if $(filter-out core,$(FUZZ_TARGET)),-$(FUZZ_TARGET))
fuzz: venv
	mkdir -p $(FUZZ_CORPUS) tests/fuzz/artifacts; rm -f tests/fuzz/artifacts/summary.txt
	FUZZ_KEEP_GOING=tests/fuzz/artifacts $(BIN)/python tests/fuzz/fuzz_$(FUZZ_TARGET).py \
	  -max_total_time=$(FUZZ_TIME) -print_final_stats=1 -print_pcs=0 -reload=0 \
	  -artifact_prefix=tests/fuzz/artifacts/ $(FUZZ_ARGS) $(FUZZ_CORPUS) $(FUZZ_SEEDS_$(FUZZ_TARGET)); \
	rc=$$?; cat tests/fuzz/artifacts/summary.txt 2>/dev/null; exit $$rc

# Kamailio is the baseline every figure is measured against
bench: system-deps venv
	.ci/install-system-deps kamailio
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# sipwatch: `make demo` runs real SIP calls through the sidecar; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench venv system-deps clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

system-deps:
	.ci/install-system-deps

demo: system-deps venv
	$(BIN)/python -m sipwatch.demo $(DEMO_ARGS)

test: system-deps venv
	$(BIN)/python -m ruff check sipwatch capture tests deploy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: system-deps venv
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# Two commands matter: `make run` and `make test`. Both set up a virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `run` needs the package; everything else also needs the test tools.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test lint demo bench setup clean

setup: $(STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Loopback only unless ARGS says otherwise (a later --listen-host wins).
run: $(RUN_STAMP)
	$(BIN)/mitmdump -s addon/qwen_addon.py --listen-host 127.0.0.1 $(ARGS)

# Qwen Code itself (from npm, into .cache/) for the interoperability tests; they skip without it.
test: $(STAMP)
	@bash .ci/install-qwen-code
	$(BIN)/python -m pytest -n 4 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check addon tests
	$(BIN)/ruff format --check addon tests

demo: $(STAMP)
	$(BIN)/python -m qwenproxy.demo $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info addon/*.egg-info .pytest_cache

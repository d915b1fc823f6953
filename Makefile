# dllm-serve developer entry points. Every target installs what it needs into .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch: the local wheel. Any other spec pulls GBs of CUDA (GPU images pass their own TORCH_SPEC;
# the torch-free operator image passes TORCH_SPEC= ).
TORCH_SPEC ?= torch==2.13.0
# runtime = the model server's stack, operator = kopf/kubernetes, test = both + the test tools
EXTRAS ?= test
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: help install run serve test test-unit cluster-up cluster-down bench clean

help:
	@echo "make run     - install and serve (the built-in demo model unless MODEL=/path/to/model)"
	@echo "make test    - install and run every test tier (unit, server, cluster, charts)"
	@echo "make bench   - run the CPU benchmarks in bench/"

$(STAMP): pyproject.toml hack/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet -c hack/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

MODEL ?=
PORT ?= 8080
run serve: install
	$(BIN)/dllm-serve serve $(if $(MODEL),--model $(MODEL)) --port $(PORT) $(ARGS)

# The cluster tier needs a real kube-apiserver; hack/test-cluster.sh builds one (cached outside the
# repo) and the tests skip loudly where it cannot, except under CI=true.
test: install
	source <(hack/test-cluster.sh up) ; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) ; rc=$$? ; \
	hack/test-cluster.sh down >/dev/null 2>&1 ; exit $$rc

test-unit: install
	$(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)

cluster-up:
	hack/test-cluster.sh up

cluster-down:
	hack/test-cluster.sh down

bench: install
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Two commands on a fresh machine: `make demo` and `make test`. Each does its own setup.
#
# EDGE_RUNTIME=gpu installs onnxruntime-gpu instead of onnxruntime (default: gpu when `nvidia-smi -L`
# lists a GPU, else cpu). The two never share one environment: switching uninstalls the other.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
EDGE_RUNTIME ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
EDGE_EXTRA := $(if $(filter gpu,$(EDGE_RUNTIME)),edge-gpu,edge)
# onnxruntime-genai and onnxruntime-genai-cuda install the same package directory, like the two ORT builds.
OTHER_ORT := $(if $(filter gpu,$(EDGE_RUNTIME)),onnxruntime onnxruntime-genai,onnxruntime-gpu onnxruntime-genai-cuda)
STAMP := $(VENV)/.installed-$(EDGE_RUNTIME)
PYTEST_ARGS ?=

# onnxruntime-genai's model builder (`python -m models export --builder genai`) imports transformers >= 5,
# which .venv cannot hold (optimum-onnx caps it below 4.58): it runs in its own environment, pinned by
# constraints-genai-build.txt. ~1 min from the local wheels; a no-op when nothing changed.
GENAI_VENV := .venv-genai-build
GENAI_PIP := $(GENAI_VENV)/bin/pip --disable-pip-version-check
GENAI_STAMP := $(GENAI_VENV)/.installed

.PHONY: setup genai-builder demo test test-fast mutate bench lint clean simulate

setup: $(STAMP)

genai-builder: $(GENAI_STAMP)

$(GENAI_STAMP): constraints-genai-build.txt
	@test -x $(GENAI_VENV)/bin/python || $(PYTHON) -m venv $(GENAI_VENV)
	@rm -f $@
	$(GENAI_PIP) install -q -c constraints-genai-build.txt torch==2.13.0
	$(GENAI_PIP) install -q -c constraints-genai-build.txt transformers onnxruntime onnxruntime-genai onnx onnx-ir
	@touch $@

# Re-run only when the dependency files change: a second `make setup` is a no-op.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(PIP) uninstall -q -y $(OTHER_ORT) 2>/dev/null || true
	# torch first and pinned: the constraints file keeps pip from ever resolving a newer (CUDA) build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EDGE_EXTRA),cloud,export,sim,dev]"
	@touch $@

demo: setup
	$(PY) -m demo

# tests/test_genai.py exports with the genai builder: its environment is part of the setup.
test: setup genai-builder
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Unit and property tests only: no verifier process, no CLI run, no real model (the `integration` marker,
# applied in tests/conftest.py) and nothing marked slow. About 1.5 min on 2 cores.
test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

# Mutation testing of core/sampling.py, cloud/rejection.py, proto/distribution.py, proto/payload.py and
# edge/hybrid.py against the fast tests that cover them ([tool.mutmut] in pyproject.toml). Works in
# mutants/ (a copy); the sources are never modified. Survivors: `$(VENV)/bin/mutmut show <name>`.
# MUTMUT_ARGS narrows the run, e.g. MUTMUT_ARGS='"cloud.rejection*"'.
MUTMUT_ARGS ?=
mutate: setup
	$(VENV)/bin/mutmut run $(MUTMUT_ARGS)
	$(VENV)/bin/mutmut results

bench: setup genai-builder
	$(PY) -m bench

# Network simulator study: record the demo pair's traces once (real edge + verifier, ~3 min), then sweep
# bandwidth x RTT x devices x policy -> reports/sim/summary.json, sweep.csv and PNG plots.
SIM_TRACES := reports/sim/traces
simulate: setup
	@test -f $(SIM_TRACES)/manifest.json || $(PY) -m simulate record --out $(SIM_TRACES) --problems 40
	$(PY) -m simulate sweep --config configs/sim_default.json --out reports/sim

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build reports/bench_cache .pytest_cache mutants

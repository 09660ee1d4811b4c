# The two README commands:
#   make bench  set everything up, then run the main job (the quick benchmark suite)
#   make test   set everything up, then run the tests
# and: make demo (a small training run with a gradient comparison), make check.
# A second run rebuilds nothing unless csrc/, setup.py or the requirements changed.

PYTHON ?= python3
VENV   ?= .venv
# On the project's machines this wheel lies on disk (CPU build); elsewhere pip
# downloads it. Override for another build, e.g. TORCH_SPEC='torch==2.14.1'.
TORCH_SPEC ?= torch==2.13.0

PY        := $(VENV)/bin/python
DEPS      := $(VENV)/.rnnkern-deps
EXT       := build/.rnnkern-ext
EXT_SRCS  := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cells/*.h csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup bench demo check test clean

setup: $(EXT)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then the package built against it without build isolation: an
# isolated build would fetch a second torch (the CUDA build, several GB).
$(DEPS): requirements-dev.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

$(EXT): $(DEPS) $(EXT_SRCS)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

bench: setup
	$(PY) -m rnnkern bench --quick

demo: setup
	$(PY) -m rnnkern demo

check: setup
	$(PY) -m rnnkern check

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build rnnkern/*.so *.egg-info

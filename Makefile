# Two set-up commands for people: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

OHIF_VERSION := 3.13.2
OHIF_DIR := .viewer/ohif-$(OHIF_VERSION)

.PHONY: venv packages viewer demo test lint bench train-phantom container-image container-test clean

venv: $(STAMP)

# The Debian packages the tests need (.ci/packages.txt): installed when run as root with apt-get, else one line
# naming what is missing and which tests that skips. Never stops the run.
packages:
	@.ci/packages

# Re-install only when the project's dependencies change; a no-op otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# OHIF's published build (npm package @ohif/app, pinned) for the browser test: `npm pack` fetches the
# package from the npm registry (its dist/ is the ready-made app; no dependency install, no build), unpacked
# into the git-ignored .viewer/. Skipped with a note when npm is not installed.
viewer: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html: | packages
	@if command -v npm >/dev/null; then \
	  mkdir -p .viewer && cd .viewer && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && \
	  rm -rf ohif-$(OHIF_VERSION) && mkdir ohif-$(OHIF_VERSION) && \
	  tar xzf ohif-app-$(OHIF_VERSION).tgz -C ohif-$(OHIF_VERSION) --strip-components=1 && \
	  rm ohif-app-$(OHIF_VERSION).tgz; \
	else echo "npm not installed: the OHIF browser test will be skipped"; fi

# The CPU container image (deploy/container/Containerfile) with podman, as tests/test_container_run.py builds it:
# on python:3.11-slim-bookworm, or, where no container registry answers, on a Debian bookworm base made once by
# mmdebstrap (tests/podman.py); then podman's layer cache keeps the test's rebuild of changed sources short.
container-image: packages venv
	$(BIN)/python tests/podman.py

# Not part of `make test`: the first build takes about 45 minutes here (base image, torch layer).
container-test: container-image
	$(BIN)/python -m pytest -q -m container tests/test_container_run.py

demo: venv
	$(BIN)/ihd-node demo

test: packages venv viewer
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check ihd_node training tests bench

bench: venv
	$(BIN)/python bench/bench_intake.py
	$(BIN)/python bench/bench_node.py
	$(BIN)/python bench/bench_completion.py
	$(BIN)/python bench/bench_alert.py
	$(BIN)/python bench/bench_clinical.py
	$(BIN)/python bench/bench_model_cpu.py
	$(BIN)/python bench/bench_model.py

train-phantom: venv
	$(BIN)/python -m training.phantom_recipe --out ihd_node/weights/default.pt

clean:
	rm -rf $(VENV) build *.egg-info .viewer

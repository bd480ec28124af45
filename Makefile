# Two set-up commands for people: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench train-phantom clean

venv: $(STAMP)

# Re-install only when the project's dependencies change; a no-op otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/ihd-node demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check ihd_node training tests bench

bench: venv
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_node.py
	$(BIN)/python bench/bench_completion.py

train-phantom: venv
	$(BIN)/python -m training.phantom_recipe --out ihd_node/weights/default.pt

clean:
	rm -rf $(VENV) build *.egg-info

# cellm: `make demo` runs the default demo, `make test` runs the tests. Both set up .venv from nothing first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellm-installed

.PHONY: demo test lint bench-memory clean

$(STAMP): pyproject.toml requirements/assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,flower]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/assets.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cellm run

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) runs .cellm-cache

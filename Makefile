# cellm: `make demo` runs the default demo, `make test` runs the tests. Both set up .venv from nothing first.
# `make docs` builds the documentation site strictly into site/ (a broken link or anchor fails it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellm-installed
DOCS_STAMP := $(VENV)/.cellm-docs-installed

.PHONY: demo test docs lint bench-memory clean

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

# The docs tools have their own stamp, so that `make test` does not install them.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) runs .cellm-cache site

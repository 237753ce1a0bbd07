# `make test` and `make demo` work on a fresh machine: they create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo parity readme install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m tlbridge.demo

parity: $(STAMP)
	$(PY) benchmarks/parity_table.py

# copy the tables the benchmarks and the demo wrote (benchmarks/out/*.md) into README.md
readme: $(STAMP)
	$(PY) benchmarks/fill_readme.py

clean:
	rm -rf $(VENV) build *.egg-info

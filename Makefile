# Warden — every target needs root and installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-unit demo bench packages reliability fuzz clean

setup: $(STAMP)
	@sh packaging/scripts/setup-host.sh
	@$(PY) -m agent.bccfind --link $(VENV)

$(STAMP): pyproject.toml setup.py $(wildcard records/*.c enforcer/masking/*.c)
	@sh packaging/scripts/setup-host.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --disable-pip-version-check --upgrade pip wheel setuptools
	@$(PIP) install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q -ra tests

test-unit: setup
	$(VENV)/bin/pytest -q -ra tests/unit

bench: setup
	$(PY) bench/run_all.py

demo: setup
	$(PY) packaging/demo.py

packages: setup
	$(PY) packaging/build_packages.py

reliability: setup
	$(PY) -m tests.reliability.run

fuzz: setup
	$(PY) -m tests.fuzz.run

clean:
	rm -rf $(VENV) build dist *.egg-info

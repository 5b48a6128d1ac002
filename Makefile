# Warden — every target needs root and installs what it needs first.
SHELL := /bin/bash
# The distribution's interpreter, the one the deb/rpm packages run on (Debian builds it with
# PGO and LTO; Warden's Python paths run 10-30% faster on it than on a plain source build
# such as a pyenv shim earlier on PATH), else the first Python >= 3.11 on PATH.
PYTHON ?= $(shell for p in /usr/bin/python3.12 /usr/bin/python3.11 /usr/bin/python3 python3; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo "$$p"; break; }; done)
PYTHON_REAL := $(shell $(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# one stamp per interpreter: a venv made from another Python is rebuilt
STAMP := $(VENV)/.installed$(subst /,_,$(PYTHON_REAL))

.PHONY: setup test test-unit demo bench packages reliability fuzz clean

setup: $(STAMP)
	@sh packaging/scripts/setup-host.sh
	@$(PY) -m agent.bccfind --link $(VENV)

$(STAMP): pyproject.toml setup.py $(wildcard records/*.c enforcer/masking/*.c enforcer/postgres/*.c)
	@sh packaging/scripts/setup-host.sh
	@test -n "$(PYTHON_REAL)" || { echo "setup: no usable Python (PYTHON='$(PYTHON)'; left unset, it is the first" \
		"Python >= 3.11 of /usr/bin/python3.12, /usr/bin/python3.11, /usr/bin/python3, python3 on PATH):" \
		"install python3 >= 3.11, or pass PYTHON=/path/to/python3" >&2; exit 1; }
	@if [ -x $(PY) ] && [ "$$(readlink -f $(VENV)/bin/python3)" != "$(PYTHON_REAL)" ]; then \
		echo "setup: rebuilding $(VENV) on $(PYTHON_REAL)"; rm -rf $(VENV); fi
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
	$(PY) -m tests.sanitize --scale 0.2

clean:
	rm -rf $(VENV) build dist *.egg-info

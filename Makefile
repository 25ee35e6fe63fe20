# attnrec: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

.PHONY: install browser demo test test-fast bench serve ui clean lock

install: $(STAMP)

# constraints.txt pins the whole tested dependency set (see `make lock`).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "attnrec needs Python >= 3.11"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The web page's browser test drives Debian's Chromium (Playwright's own browser download cannot
# run here): installed when missing if we are root, else a message says how.
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; \
	  else \
	    echo "error: the browser test needs Chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium', or set CHROMIUM=/path/to/chromium" >&2; \
	    exit 1; \
	  fi; }

demo: install
	$(BIN)/attnrec demo

# One pytest-xdist worker per core; tests that share a costly fixture or Ray stay together.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: install browser
	$(PYTEST)

test-fast: install browser
	$(PYTEST) -m "not slow"

bench: install
	$(BIN)/python bench/ingest.py

serve: install
	$(BIN)/attnrec deploy

ui: install
	$(BIN)/attnrec ui

# Re-resolve the dependency set from pyproject.toml and record it (run after changing dependencies).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q torch==2.13.0 -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .attnrec

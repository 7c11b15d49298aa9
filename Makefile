# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the browser the console's test drives: Debian's package, never a download of playwright's own
CHROMIUM := /usr/bin/chromium

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on this disk; anything else pulls a CUDA build
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

install: $(STAMP) $(CHROMIUM)

demo: $(STAMP)
	$(BIN)/homepage demo

# test processes: one per core, at most 4 (the API tests each start a server with its own workers);
# a test file runs whole in one process, so its module-scoped server starts once
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/mypy

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) homepage-data .pytest_cache

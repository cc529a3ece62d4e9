# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing and
# install EXACTLY the versions of requirements.lock (the torch pair included), then hfx itself without
# resolving anything; the stamp file re-runs the install when pyproject.toml or the lock changes.
# `make lock` refreshes the lock from the ranges of pyproject.toml; `make test-latest` runs the suite
# against what a user who runs `pip install hfx` gets today (not part of CI).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.hfx-installed
# The torch pair (x86_64, Python 3.11: pip takes both from this machine's disk); see README.
TORCH := torch==2.14.1 torchvision==0.29.1
# Extra requirements make test-latest installs over the newest set, without their dependencies, to try a
# release that pyproject.toml excludes: make test-latest LATEST_EXTRA='transformers==5.24.0'
LATEST_EXTRA ?=

.PHONY: demo test lint bench venv lock test-latest clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@extra=$$($(BIN)/python -m pip freeze --all --exclude-editable | grep -vxFf <(grep -v '^#' $(LOCK)) || true); \
	  if [ -n "$$extra" ]; then echo "note: $(VENV) holds packages or versions that $(LOCK) does not list" \
	  "(installed by hand?): $$(echo $$extra); 'make clean' starts over from the lock"; fi
	@touch $(STAMP)

demo: venv
	$(BIN)/hfx demo

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: venv
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# Resolve the newest versions that pyproject.toml allows (dev and bench extras included) in a fresh
# virtual environment and write them, pinned, to the lock.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet $(TORCH)
	.venv-lock/bin/pip install --quiet -e '.[dev,bench]'
	{ echo "# Exact versions that make test, make demo and CI install (pip requirements format). Written by"; \
	  echo "# 'make lock' on $$(date -u +%Y-%m-%d) from the ranges of pyproject.toml; Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The whole suite against the newest releases pyproject.toml allows (what `pip install hfx` resolves
# today), in .venv-latest; prints how they differ from the lock. Run it before `make lock`.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/pip install --quiet $(TORCH)
	.venv-latest/bin/pip install --quiet -e '.[dev]'
	$(if $(LATEST_EXTRA),.venv-latest/bin/pip install --quiet --no-deps $(LATEST_EXTRA))
	@echo "newer than $(LOCK):"; diff <(grep -v '^#' $(LOCK)) <(.venv-latest/bin/python -m pip freeze --all --exclude-editable) \
	  | grep '^>' || echo "  nothing"
	.venv-latest/bin/python -m pytest

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build dist *.egg-info .pytest_cache .ruff_cache

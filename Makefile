# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing and
# install EXACTLY the versions of requirements.lock (the torch pair included), then hfx itself without
# resolving anything; the stamp file re-runs the install when pyproject.toml or the lock changes. The lock is a
# complete `pip freeze`, installed with --no-deps: gradio declares pillow<13 and tomlkit<0.15, which the lock's
# pillow 13.0.0 and tomlkit 0.15.2 do not meet, and gradio runs with both (tests/test_space.py drives it).
# `make test` also installs Debian's chromium for the browser tests (`make browser`; it needs root).
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

.PHONY: demo test lint bench venv browser lock test-latest clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(BIN)/python -m pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@extra=$$($(BIN)/python -m pip freeze --all --exclude-editable | grep -vxFf <(grep -v '^#' $(LOCK)) || true); \
	  if [ -n "$$extra" ]; then echo "note: $(VENV) holds packages or versions that $(LOCK) does not list" \
	  "(installed by hand?): $$(echo $$extra); 'make clean' starts over from the lock"; fi
	@touch $(STAMP)

demo: venv
	$(BIN)/hfx demo

lint: venv
	$(BIN)/ruff check .

# The browser tests (pytest marker `browser`) drive the system's chromium through Playwright: no browser can be
# downloaded at run time, so Debian's package is installed here. Without root (and no chromium) they skip, saying why.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium (apt-get) for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: no chromium here and installing it needs root and apt-get: the browser tests will skip" \
	  "(as root: apt-get install chromium)"; fi

test: venv browser
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

# The two front-door commands (README): `make demo` runs the main job, `make test` the tests.
# Each builds .venv on first use (Python 3.11 and make are all a fresh machine needs) and reuses it after.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean postgresql

$(STAMP): pyproject.toml constraints/test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints/test.txt -e '.[test,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/catrs demo

test: $(STAMP) postgresql
	$(BIN)/python -m pytest -q

# The tracking-server tests run a real PostgreSQL on loopback (tests/helpers.py starts and stops it): Debian's
# package, installed here if the machine lacks it (as root, or through sudo). No service is started.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# Lint and type check (.ci/run runs it before the tests): ruff's rules and formatting, then mypy; settings in
# pyproject.toml, tool versions pinned by the `lint` extra.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/certify_throughput.py
	$(BIN)/python benchmarks/inference_default.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/certify_scaling.py

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache

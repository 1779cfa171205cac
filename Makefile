# The two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-all lint format bench clean install-espeak

# Debian's espeak-ng synthesises the spoken dataset (polymodal-data spoken): installed when
# missing and we are root; otherwise, or when apt fails, one line says so (setup goes on).
# A prerequisite only while missing, so a set-up checkout has nothing to do (`make -q setup`).
ESPEAK := $(if $(shell command -v espeak-ng),,install-espeak)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
setup: $(STAMP) $(ESPEAK)

install-espeak:
	@{ [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
		&& { $(APT_INSTALL) espeak-ng || { apt-get update -qq && $(APT_INSTALL) espeak-ng; }; }; } \
		|| echo "setup: polymodal-data spoken needs espeak-ng: apt-get install espeak-ng"

# Reinstall whenever the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# Generates data/shapes on first use, then trains the default experiment (CLIP on shapes).
train: setup
	$(PY) -m polymodal.train $(ARGS)

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Everything, slow tests included (what .ci/run runs).
test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) logs .pytest_cache .ruff_cache

# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv on first use with exactly the versions in constraints.txt
# (the lock CI tested); `make lock` refreshes it, `make test-latest` tries the newest.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
LOCK   := constraints.txt
UV     := uv==0.13.9
EXTRAS := test,examples

# Tests that need no server and take no more than a few seconds each.
FAST   := not (slurm or broker or s3 or browser or podman or panda or slow)

.PHONY: demo test test-fast test-latest lock lint format bench clean services

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/hpo_bayes.py

test: $(STAMP) lint services
	$(VENV)/bin/pytest

# The edit-test loop: no real servers, no slow tests (about a minute).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -n 2 -m '$(FAST)'

# The whole suite against the newest releases of every dependency, in a venv of
# its own, so an upstream change is found on purpose (then `make lock`).
test-latest: services
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/pytest

# Re-resolve every extra for every supported Python (3.10 up) and write the lock.
lock: $(STAMP)
	$(PY) -m pip install --quiet "$(UV)"
	$(VENV)/bin/uv pip compile --quiet --universal --python-version 3.10 --all-extras \
		--upgrade pyproject.toml -o $(LOCK)

# Real servers the tests talk to (ActiveMQ, Slurm, podman, chromium); installed with
# apt-get when missing (as root).
services:
	bash .ci/install-services

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The peers (Dask, Parsl) come with the bench extra; a full run takes about 5 minutes.
bench: $(STAMP)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[bench]'
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .venv-latest build dist *.egg-info .pytest_cache .ruff_cache

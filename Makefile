# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv from nothing.
VENV ?= .venv
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE = 1
export PYTHONUNBUFFERED = 1

.PHONY: bootstrap demo test test-all test-soak test-matrix lint bench

# Python versions for test-matrix (pyenv interpreters); CI runs 3.11 only (.ci/run -> make test).
MATRIX ?= 3.12 3.13

bootstrap:
	@bash infra/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/headwater demo

# The README's test command (and CI's): everything not marked slow, fast end-to-end paths included
# (real broker, real Beam runner, real torchrun), inside the 2-core CI budget.
test: bootstrap
	$(VENV)/bin/pytest -ra --durations=15 -m "not slow" tests

# Everything, the slow fault-injection / multi-process / fuzz trials too (about an hour on 2 cores).
test-all: bootstrap
	$(VENV)/bin/pytest -ra --durations=15 tests

# The fuzz suite at issue 14's full size: >= 10,000 records per topic through the real consumers.
test-soak: bootstrap
	HEADWATER_FUZZ_RECORDS=10000 $(VENV)/bin/pytest -ra -m slow tests/test_fuzz_consumers.py tests/test_ingest_isolation.py

lint: bootstrap
	$(VENV)/bin/ruff check streams beam_jobs trainer evaluators infra tests bench

# Builds .venv-<version> with infra/bootstrap.sh for each MATRIX version and runs the fast tests there.
test-matrix:
	@set -e; for v in $(MATRIX); do \
	  py=$$(ls -d $$(pyenv root 2>/dev/null)/versions/$$v.*/bin/python$$v 2>/dev/null | tail -1); \
	  py=$${py:-$$(command -v python$$v)}; \
	  [ -n "$$py" ] || { echo "test-matrix: no python$$v found"; exit 1; }; \
	  echo "test-matrix: $$v ($$py)"; \
	  PYTHON=$$py VENV=.venv-$$v bash infra/bootstrap.sh; \
	  .venv-$$v/bin/pytest -ra -m "not slow" tests; \
	done

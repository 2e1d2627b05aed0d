"""The suite's own set-up: what tests/conftest.py arranges for pytest-xdist does reach it."""

from __future__ import annotations

import os

import pytest


def test_the_parallel_suite_keeps_a_module_on_one_worker(request):
    """`make test` runs 2 workers; a module's fixtures (a converted model, a training run) are built
    once only if its tests share a worker. xdist groups by a suffix of the test's id, which a pytest
    it does not support drops without a word."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("one process (no -n): nothing to group")
    assert request.node.nodeid.endswith("@tests/test_suite.py"), request.node.nodeid

"""Fixtures every test directory shares. Helpers live in ``tests/helpers`` (importable as
``helpers.*``: pytest puts ``tests/`` on the path, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture
def fresh_seed() -> int:
    """A seed drawn anew for every test run, so that random-input tests explore; pytest
    shows it in a failing test's locals (``-l``) and the test reports it in its asserts."""
    return random.SystemRandom().randrange(2**31)

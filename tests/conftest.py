"""`backend` runs a test once per installed backend (the SciPy habit).

TLBRIDGE_TEST_BACKENDS=torch (or keras) narrows the set; parity tests need both.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS


@pytest.fixture(params=[pytest.param(b, id=b) for b in BACKENDS])
def backend(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(items):
    """Run each backbone's parity tests together (the `bb` fixture is module-scoped and builds
    a backbone's models once); pytest's own grouping interleaves them across test functions."""
    def key(pair):
        index, item = pair
        callspec = getattr(item, "callspec", None)
        bb = callspec.params.get("bb") if callspec else None
        return (item.module.__name__ if hasattr(item, "module") else "", str(bb) if bb else "", index)

    order = sorted(enumerate(items), key=key)
    items[:] = [item for _, item in order]

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

"""`backend` runs a test once per installed backend (the SciPy habit).

TLBRIDGE_TEST_BACKENDS=torch (or keras) narrows the set; parity tests need both.
"""
from __future__ import annotations

import sys

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


def _numeric_globals() -> dict:
    """Process-wide settings that change every later test's numbers when a test leaks them."""
    out = {}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch matmul precision"] = torch.get_float32_matmul_precision()
        mkldnn = getattr(torch.backends, "mkldnn", None)
        for name, knob in (("torch cuda matmul", torch.backends.cuda.matmul),
                           ("torch oneDNN matmul", getattr(mkldnn, "matmul", None)),
                           ("torch oneDNN conv", getattr(mkldnn, "conv", None))):
            if isinstance(getattr(knob, "fp32_precision", None), str):
                out[name] = knob.fp32_precision
        out["torch default dtype"] = str(torch.get_default_dtype())
    if "jax" in sys.modules:
        out["jax matmul precision"] = sys.modules["jax"].config.jax_default_matmul_precision
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        out["keras floatx"] = keras.config.floatx()
        out["keras dtype policy"] = keras.config.dtype_policy().name
    return out


@pytest.fixture(autouse=True)
def _no_leaked_numeric_state():
    """A test that leaves torch's matmul precision at "medium" makes every later fp32 check run
    in bf16 on AMX CPUs (CI failed that way); fail the leaking test itself, and restore."""
    before = _numeric_globals()
    yield
    after = _numeric_globals()
    leaked = {k: (before[k], after[k]) for k in before if k in after and before[k] != after[k]}
    if leaked:
        _restore(before)
        pytest.fail(f"Expected the test to leave process-wide numeric settings as it found them; "
                    f"it changed {leaked} (before, after). Restore them in a finally block.")


def _restore(before: dict) -> None:
    torch, keras, jax = sys.modules.get("torch"), sys.modules.get("keras"), sys.modules.get("jax")
    if jax is not None and "jax matmul precision" in before:
        jax.config.update("jax_default_matmul_precision", before["jax matmul precision"])
    if torch is not None and "torch matmul precision" in before:
        torch.set_float32_matmul_precision(before["torch matmul precision"])
        mkldnn = getattr(torch.backends, "mkldnn", None)
        for name, knob in (("torch cuda matmul", torch.backends.cuda.matmul),
                           ("torch oneDNN matmul", getattr(mkldnn, "matmul", None)),
                           ("torch oneDNN conv", getattr(mkldnn, "conv", None))):
            if name in before:
                knob.fp32_precision = before[name]
        torch.set_default_dtype(getattr(torch, before["torch default dtype"].split(".")[-1]))
    if keras is not None and "keras floatx" in before:
        keras.config.set_floatx(before["keras floatx"])
        keras.config.set_dtype_policy(before["keras dtype policy"])

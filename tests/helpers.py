"""Helpers the tests import (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tlbridge as tl  # noqa: E402

_wanted = os.environ.get("TLBRIDGE_TEST_BACKENDS")
BACKENDS = [b for b in tl.available_backends() if not _wanted or b in _wanted.split(",")]

both_backends = pytest.mark.skipif(
    not {"torch", "keras"} <= set(BACKENDS), reason="parity needs torch and keras installed")


def small_model(backend, name="seed_vgg", num_outputs=1, dtype="float32", seed=0,
                input_shape=(32, 32, 3), **options):
    m = tl.load_backbone(name, backend=backend, input_shape=input_shape, dtype=dtype, seed=seed,
                         **options)
    return tl.replace_head(m, num_outputs, seed=seed + 1)


def learnable(n, seed=0, shape=(16, 16, 3)):
    """n float64 images and a label a small net can learn (is the red channel's mean > 0?)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]
    return x, y


def tensorflow_uses_onednn() -> bool:
    """TensorFlow's CPU kernels: oneDNN's (the x86 default) or Eigen's (TF_ENABLE_ONEDNN_OPTS=0).
    They round differently, so a bar measured against one kernel library names which."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"

"""Cross-backend parity measurement: the same weights and batch through torch and Keras.

Used by the test suite and by `benchmarks/parity_table.py`; also useful to a user who
moved a model between frameworks and wants the figure for their own weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import api


def rel_diff(a, b, floor: float = 0.0) -> float:
    """max |a - b| / max(max |a|, floor) (the plain difference when both scales are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max()) if a.size else 0.0, floor)
    diff = np.abs(a - b).max() if a.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def worst(a: dict, b: dict, floor_rel: float = 0.0) -> tuple[float, str]:
    """Worst rel_diff over the keys of two dicts of arrays (keys must agree).

    floor_rel > 0 measures tensors smaller than floor_rel x (the largest magnitude of any
    tensor) against that floor instead of their own scale. Weights use 1e-6: a conv bias
    feeding train-mode BatchNorm has an exactly-zero gradient in exact arithmetic, so after
    training it holds only rounding noise (~1e-18 on both backends), and a ratio of two
    noises says nothing.
    """
    if set(a) != set(b):
        raise AssertionError(f"different keys: {sorted(set(a) ^ set(b))[:5]}")
    if not a:
        return 0.0, ""
    floor = floor_rel * max(float(np.abs(np.asarray(v)).max()) if np.size(v) else 0.0 for v in a.values())
    return max((rel_diff(a[k], b[k], floor), k) for k in a)


@dataclass
class ParityResult:
    loss: float          # relative difference of the loss
    grads: float         # worst relative difference over every gradient tensor
    grads_at: str
    stats: float         # worst relative difference of all weights after the pass (BN stats)
    n_grads: int


def pair(backbone: str, *, dtype="float64", num_outputs=1, input_shape=(32, 32, 3), seed=0,
         hidden=(), **options):
    """The same seeded model on torch and Keras (identical canonical weights)."""
    mt = api.load_backbone(backbone, backend="torch", input_shape=input_shape, dtype=dtype,
                           seed=seed, **options)
    mt = api.replace_head(mt, num_outputs, hidden=hidden, seed=seed + 1)
    mk = api.convert(mt, "keras")
    return mt, mk


def batch(input_shape, n, num_outputs, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype(dtype)
    y = (rng.random((n, num_outputs)) > 0.5).astype(dtype)
    return x, y


def compare(mt, mk, x, y, *, training: bool) -> ParityResult:
    lt, gt = api.bce_loss_and_grads(mt, x, y, training=training)
    lk, gk = api.bce_loss_and_grads(mk, x, y, training=training)
    g, at = worst(gt, gk)
    s, _ = worst(api.get_weights(mt), api.get_weights(mk))
    return ParityResult(rel_diff(lt, lk), g, at, s, len(gt))

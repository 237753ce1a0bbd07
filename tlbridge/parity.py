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


# The configuration the test suite and `make parity` measure: 32x32 (resnet50 at 32x32 ends
# at 1x1, where train-mode BatchNorm over 4 numbers amplifies fp64 rounding to 1.2e-10; at
# 64x64 it normalises over 16), batch 4 in fp64 and 8 in fp32 (with 4, resnet18's last stage
# reaches 1.2e-4 from fp32 rounding alone), BatchNorm calibrated by 10 train-mode passes.
SHAPE = (32, 32, 3)
SHAPES = {"resnet50": (64, 64, 3)}
BATCH = {"float64": 4, "float32": 8}
CALIBRATE = 10
TOL = {"float64": 1e-10, "float32": 1e-4}

# A tensor whose entries are all below this fraction of the largest tensor's magnitude, on
# both backends, is zero to rounding (see split_zeros).
ZERO = {"float64": 1e-12, "float32": 1e-5}


def split_zeros(a: dict, b: dict, zero_rel: float, bn_layers: set) -> tuple[float, str, float, int]:
    """(worst relative difference over the other tensors, its name, worst zero level, number
    of zero-to-rounding tensors).

    Two BatchNorm tensors can be exactly zero in exact arithmetic: the gradient of a BN bias
    whose output only feeds a linear layer and another train-mode BatchNorm (which removes any
    shift), and the running mean of a BN fed by zero-mean channels. Both frameworks return
    rounding noise there, and the ratio of two noises is no measure of parity. So a BN bias
    (running mean) whose magnitude on both backends is at most zero_rel x that of its own
    layer's weight (running variance) is checked for being zero on both sides instead; its
    level is that ratio. Only BatchNorm layers qualify: their normalised input makes weight
    and bias gradients of the same scale unless the bias one vanishes structurally.
    """
    if set(a) != set(b):
        raise AssertionError(f"different keys: {sorted(set(a) ^ set(b))[:5]}")

    def mag(d, k):
        return float(np.abs(np.asarray(d[k])).max(initial=0.0))

    zeros, level = [], 0.0
    for k in a:
        layer, _, leaf = k.rpartition(".")
        sibling = {"bias": "weight", "running_mean": "running_var"}.get(leaf)
        if layer in bn_layers and sibling and f"{layer}.{sibling}" in a:
            ref = mag(a, f"{layer}.{sibling}")
            m = max(mag(a, k), mag(b, k))
            if ref > 0 and m <= zero_rel * ref:
                zeros.append(k)
                level = max(level, m / ref)
    rest = {k: a[k] for k in a if k not in zeros}
    worst_rel, at = worst(rest, {k: b[k] for k in rest})
    return worst_rel, at, level, len(zeros)


@dataclass
class ParityResult:
    loss: float          # relative difference of the loss
    grads: float         # worst relative difference over every non-zero gradient tensor
    grads_at: str
    stats: float         # worst relative difference of the non-zero weights after the pass
    n_grads: int
    zero_grads: int = 0  # gradient tensors that are zero to rounding on both backends
    zero_level: float = 0.0   # their largest magnitude / their layer weight's (<= ZERO[dtype])


def pair(backbone: str, *, dtype="float64", num_outputs=1, input_shape=(32, 32, 3), seed=0,
         hidden=(), calibrate: int = 0, **options):
    """The same seeded model on torch and Keras (identical canonical weights).

    calibrate=n first runs n train-mode passes on a random batch (torch side), so BatchNorm
    running statistics describe real activations, as in a pretrained network. With the
    init's mean 0 / variance 1, eval-mode activations of deep nets (mobilenet, efficientnet)
    grow or shrink by orders of magnitude and gradients span 1e-13 of each other.
    """
    mt = api.load_backbone(backbone, backend="torch", input_shape=input_shape, dtype=dtype,
                           seed=seed, **options)
    mt = api.replace_head(mt, num_outputs, hidden=hidden, seed=seed + 1)
    if calibrate:
        x, y = batch(input_shape, 8, num_outputs, seed=seed + 100, dtype=dtype)
        for _ in range(calibrate):
            api.bce_loss_and_grads(mt, x, y, training=True)
    mk = api.convert(mt, "keras")
    return mt, mk


def batch(input_shape, n, num_outputs, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *input_shape)).astype(dtype)
    y = (rng.random((n, num_outputs)) > 0.5).astype(dtype)
    return x, y


def fp32_error(m32, x, y, *, training: bool) -> float:
    """How far `m32`'s own fp32 gradients are from exact (fp64) ones on the same weights: the
    scale against which a cross-framework fp32 difference can be judged. Leaves m32 as it was."""
    weights = api.get_weights(m32)
    spec = m32.spec
    m64 = api.load_backbone(spec.backbone, backend=m32.backend, input_shape=spec.input_shape,
                            dtype="float64", **dict(spec.options))
    m64 = api.replace_head(m64, spec.head.num_outputs, hidden=spec.head.hidden)
    api.set_weights(m64, weights)
    if m32.frozen:
        api.freeze(m64, sorted(m32.frozen))
    _, g32 = api.bce_loss_and_grads(m32, x.astype("float32"), y, training=training)
    _, g64 = api.bce_loss_and_grads(m64, x.astype("float64"), y, training=training)
    api.set_weights(m32, weights)
    bn = {k.rpartition(".")[0] for k in weights if k.endswith(".running_var")}
    return split_zeros(g64, g32, ZERO["float32"], bn)[0]


def compare(mt, mk, x, y, *, training: bool) -> ParityResult:
    lt, gt = api.bce_loss_and_grads(mt, x, y, training=training)
    lk, gk = api.bce_loss_and_grads(mk, x, y, training=training)
    zero = ZERO[mt.dtype]
    wt, wk = api.get_weights(mt), api.get_weights(mk)
    bn = {k.rpartition(".")[0] for k in wt if k.endswith(".running_var")}
    g, at, level, n_zero = split_zeros(gt, gk, zero, bn)
    s, _, _, _ = split_zeros(wt, wk, zero, bn)
    return ParityResult(rel_diff(lt, lk), g, at, s, len(gt), n_zero, level)

"""Cross-backend parity measurement: the same weights and batch through torch and Keras.

Used by the test suite and by `benchmarks/parity_table.py`; also useful to a user who
moved a model between frameworks and wants the figure for their own weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import api, devices, zoo
from .specs import InputSpec


def rel_diff(a, b, floor: float = 0.0) -> float:
    """max |a - b| / max(max |a|, floor) (the plain difference when both scales are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max()) if a.size else 0.0, floor)
    diff = np.abs(a - b).max() if a.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def largest(d: dict) -> float:
    """The largest magnitude of any entry of any tensor in a dict of arrays (0 if none)."""
    return max((float(np.abs(np.asarray(v)).max()) for v in d.values() if np.size(v)), default=0.0)


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
    floor = floor_rel * largest(a)
    return max((rel_diff(a[k], b[k], floor), k) for k in a)


# Bars. fp64 is the truth: the two backends agree to TOL["float64"] per tensor. In fp32 each
# backend is judged against that truth, per tensor (error = max|g32 - g64| / max|g64|), over
# seeded batches (tlbridge/fp32.py): Keras fails a tensor where it is above FP32_C x torch on the
# same batch in significantly more than half the batches, or where either backend's median is
# above FP32_CEILING. A line through the ratio of two medians of rounding noise moved with the
# CPU's thread count; a test of significance over the batches does not.
TOL = {"float64": 1e-10, "float32": 1e-4}
FP32_C = 4.0
FP32_CEILING = 1e-2

# Gradients that are zero in exact arithmetic (see expected_zero_grads) are zero to rounding:
# below ZERO[dtype] x the largest gradient of the model.
ZERO = {"float64": 1e-12, "float32": 1e-5}

CALIBRATE = 4     # passes of cumulative BatchNorm calibration (see calibrate)
SEED_BATCH = 1


@dataclass(frozen=True)
class Config:
    """The float64 batch each backbone is compared on (float32: tlbridge/fp32.py)."""
    shape: tuple = (32, 32, 3)
    batch64: int = 4


CONFIGS = {
    # 64x64: at 32x32 their last stage is 1x1, and there resnet50's train-mode BatchNorm over
    # 4 numbers amplifies float64 rounding to 1.2e-10
    "vgg16": Config(shape=(64, 64, 3)),
    "resnet50": Config(shape=(64, 64, 3)),
    "token_bag": Config(shape=(16,)),       # token ids (any length; batches of 12) + masks
}


def config(name: str, **options) -> Config:
    """The measured configuration of a backbone (seed_vgg with batch_norm=True is "seed_vgg_bn")."""
    key = f"{name}_bn" if options.get("batch_norm") else name
    if key not in CONFIGS and zoo.PORTABLE[name].inputs == "tokens":
        return CONFIGS["token_bag"]
    return CONFIGS.get(key, Config())


def rel_errors(g: dict, truth: dict, skip=(), floor_rel: float = 0.0) -> dict:
    """Per tensor: max |g - truth| / max |truth| (floored at floor_rel x the largest magnitude)."""
    floor = floor_rel * largest(truth)
    return {k: rel_diff(truth[k], g[k], floor) for k in truth if k not in skip}


def zero_set(g64: dict, zero_rel: float = ZERO["float64"]) -> set:
    """The gradient tensors that are zero to float64 rounding (<= zero_rel x the largest)."""
    top = largest(g64)
    return {k for k, v in g64.items() if float(np.abs(v).max(initial=0.0)) <= zero_rel * top}


def zero_level(g: dict, zeros) -> float:
    """Largest magnitude of g over `zeros`, relative to g's largest gradient anywhere."""
    top = largest(g)
    level = max((float(np.abs(g[k]).max(initial=0.0)) for k in zeros), default=0.0)
    return level / top if top > 0 else level


_PROJECTION_BN_BIAS = {
    # the last BatchNorm of an inverted-residual / MBConv block, which has no activation after it
    "mobilenet_v2": re.compile(r"backbone\.features\.(1\.conv\.2|([2-9]|1[0-7])\.conv\.3)\.bias"),
    "efficientnet_b0": re.compile(r"backbone\.features\.[1-7]\.\d+\.block\.[23]\.1\.bias"),
}


def expected_zero_grads(m, training: bool) -> set:
    """Gradients that are exactly zero by the architecture: in train mode, a train-mode
    BatchNorm removes any per-channel shift of its input, so a bias whose output reaches the next
    BatchNorm only through linear maps (a conv bias right before BN; a projection BN's bias, via
    residual adds and 1x1 convs) has zero gradient. Eval mode has none of those. In attention
    (either mode) the key bias adds q.b_k to every key's score alike, which the softmax removes:
    its gradient is zero."""
    trainable = set(api.trainable_names(m))
    keys = {k for k in trainable if k.endswith("attention.self.key.bias")}
    if not training:
        return keys
    weights = api.get_weights(m)
    out = set()
    rule = _PROJECTION_BN_BIAS.get(m.backbone_name)
    if rule:
        out |= {k for k in trainable if rule.fullmatch(k)}
    for k in trainable:                       # conv bias immediately followed by a BatchNorm
        prefix, _, leaf = k.rpartition(".")
        parent, _, idx = prefix.rpartition(".")
        if leaf == "bias" and idx.isdigit() and np.ndim(weights.get(f"{prefix}.weight")) == 4:
            bn = f"{parent}.{int(idx) + 1}"
            if f"{bn}.running_var" in weights and f"{bn}.weight" in trainable:
                out.add(k)
    return out | keys


def calibrate(m, x, y, passes: int = CALIBRATE) -> None:
    """Give BatchNorm running statistics that describe real activations, as in a pretrained
    network: `passes` train-mode passes with cumulative averaging (torch's momentum=None), each
    over its own batch (x, y: a list of them; one batch is used for every pass), then the
    momentum restored. With the init's mean 0 / variance 1, eval-mode activations of deep
    nets grow or shrink by orders of magnitude. Torch models only (duck-typed)."""
    bns = [mod for mod in m.native.modules()
           if hasattr(mod, "running_var") and hasattr(mod, "reset_running_stats")]
    saved = [mod.momentum for mod in bns]
    for mod in bns:
        mod.reset_running_stats()
        mod.momentum = None
    try:
        for i in range(passes):
            xi, yi = (x[i % len(x)], y[i % len(y)]) if isinstance(x, list) else (x, y)
            api.bce_loss_and_grads(m, xi, yi, training=True)
    finally:
        for mod, mom in zip(bns, saved):
            mod.momentum = mom


_calibrate = calibrate   # pair() takes a `calibrate` argument of the same name


def pair(backbone: str, *, dtype="float64", num_outputs=1, input_shape=None, seed=0,
         hidden=(), calibrate: int = 0, **options):
    """The same seeded model on torch and Keras (identical canonical weights); calibrate=n
    first calibrates BatchNorm with n passes (see `calibrate`). input_shape: (32, 32, 3) for
    images, (16,) for token backbones, unless given."""
    mt = seeded_torch(backbone, dtype=dtype, num_outputs=num_outputs, input_shape=input_shape,
                      seed=seed, hidden=hidden, calibrate=calibrate, **options)
    return mt, api.convert(mt, "keras")


def seeded_torch(backbone: str, *, dtype="float64", num_outputs=1, input_shape=None, seed=0,
                 hidden=(), calibrate: int = 0, **options):
    """pair()'s torch model alone (suite() builds its Keras models itself)."""
    if input_shape is None:
        input_shape = (16,) if zoo.signature(backbone, (1,))[0].kind == "tokens" else (32, 32, 3)
    mt = api.load_backbone(backbone, backend="torch", input_shape=input_shape, dtype=dtype,
                           seed=seed, **options)
    mt = api.replace_head(mt, num_outputs, hidden=hidden, seed=seed + 1)
    if calibrate:
        drawn = [batch(mt.inputs, 16, num_outputs, seed=seed + 100 + i, dtype=dtype)
                 for i in range(calibrate)]
        _calibrate(mt, [x for x, _ in drawn], [y for _, y in drawn], calibrate)
    return mt


def batch(inputs, n, num_outputs, seed=0, dtype="float64", length: int = 12):
    """A seeded batch (x, y) for a model's declared inputs (m.inputs), or for images of shape
    `inputs` (H, W, C): float inputs normal, token ids uniform below the vocabulary, attention
    masks right-padded to random lengths (every row keeps a token); `length` for any-length
    sequences. BCE labels in {0, 1}."""
    rng = np.random.default_rng(seed)
    if not (inputs and isinstance(inputs[0], InputSpec)):
        inputs = (InputSpec("images", tuple(inputs)),)
    x = {}
    for spec in inputs:
        shape = (n, *(length if d is None else d for d in spec.shape))
        if spec.kind == "tokens":
            x[spec.name] = rng.integers(0, spec.high or 100, size=shape)
        elif spec.kind == "mask":
            x[spec.name] = (np.arange(shape[-1]) < rng.integers(1, shape[-1] + 1, (n, 1))).astype(np.int64)
        else:
            x[spec.name] = rng.normal(size=shape).astype(dtype)
    y = (rng.random((n, num_outputs)) > 0.5).astype(dtype)
    return (x if len(x) > 1 else next(iter(x.values()))), y


@dataclass
class Suite:
    """Four models with identical weights on the float32 grid: torch/Keras x float64/float32.
    reset() puts back those weights and a freeze state, so tests can share one Suite."""
    name: str
    num_outputs: int
    models: dict          # (backend, dtype) -> model
    weights: dict         # canonical, float64 values on the float32 grid

    def reset(self, frozen: bool) -> None:
        for (_, dtype), m in self.models.items():
            api.unfreeze(m, "all")
            api.set_weights(m, {k: v.astype(dtype) for k, v in self.weights.items()})
            if frozen:
                api.freeze(m, "backbone")


def _float32_grid(weights: dict) -> dict:
    """float64 values that float32 holds exactly: every model of a suite starts from them."""
    return {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}


def suite(name: str, num_outputs: int = 3, seed: int = 0, input_shape=None, **options) -> Suite:
    """input_shape: the configuration's (CONFIGS) unless given."""
    shape = tuple(input_shape or config(name, **options).shape)
    mt = seeded_torch(name, dtype="float64", num_outputs=num_outputs, input_shape=shape, seed=seed,
                      calibrate=CALIBRATE, **options)
    weights = _float32_grid(api.get_weights(mt))
    models = {}
    for backend in ("torch", "keras"):
        for dtype in ("float64", "float32"):
            m = mt if (backend, dtype) == ("torch", "float64") else api.replace_head(
                api.load_backbone(name, backend=backend, input_shape=shape, dtype=dtype,
                                  **options), num_outputs)
            models[backend, dtype] = m
    s = Suite(name, num_outputs, models, weights)
    s.reset(frozen=False)
    return s


def rehead(s: Suite, num_outputs: int, seed: int = 0) -> Suite:
    """suite(s.name, num_outputs, seed, ...) without building the backbones again: s's models
    (its backbones, BatchNorm calibrated on inputs the head does not change) under new seeded
    heads. The new suite shares the backbones with s; each suite's reset() puts its weights back."""
    s.reset(frozen=False)
    mt = api.replace_head(s.models["torch", "float64"], num_outputs, seed=seed + 1)
    weights = _float32_grid(api.get_weights(mt))
    models = {key: mt if key == ("torch", "float64") else api.replace_head(m, num_outputs)
              for key, m in s.models.items()}
    out = Suite(s.name, num_outputs, models, weights)
    out.reset(frozen=False)
    return out


@dataclass
class ParityResult:
    """float64: torch vs Keras, per tensor."""
    loss: float
    grads: float          # worst relative difference over the gradients outside `zeros`
    grads_at: str
    stats: float          # worst relative difference of weights/BN statistics after the pass
    n_grads: int
    zeros: set            # gradients zero to rounding by torch float64 (must equal the expected set)
    zero_level: float     # largest of both backends' magnitudes there / largest gradient


def compare(mt, mk, x, y, *, training: bool, loss: str | None = None) -> ParityResult:
    """Loss (the head's, or `loss=`), every gradient and the weights after the pass; TF32
    off on both frameworks while it runs (tlbridge/devices.py)."""
    with devices.precision(tf32=False):
        lt, gt = api.loss_and_grads(mt, x, y, training=training, loss=loss)
        lk, gk = api.loss_and_grads(mk, x, y, training=training, loss=loss)
    zeros = zero_set(gt)
    g = rel_errors(gk, gt, skip=zeros)
    at = max(g, key=g.get) if g else ""
    stats, _ = worst(api.get_weights(mt), api.get_weights(mk), floor_rel=1e-6)
    return ParityResult(rel_diff(lt, lk), g.get(at, 0.0), at, stats, len(gt), zeros,
                        max(zero_level(gt, zeros), zero_level(gk, zeros)))


def stat_errors(w: dict, truth: dict) -> dict:
    """Per BatchNorm layer, the running mean's and variance's error against the truth. A mean is
    measured against the spread of what it averages (its max |mean| or max sqrt(var), whichever
    is larger): the mean of zero-mean channels is zero to rounding, and noise/noise says nothing."""
    out = {}
    for k in truth:
        if k.endswith(".running_var"):
            layer = k[: -len(".running_var")]
            mean = f"{layer}.running_mean"
            spread = float(np.sqrt(np.abs(truth[k]).max()))
            out[k] = rel_diff(truth[k], w[k])
            out[mean] = rel_diff(truth[mean], w[mean], floor=spread)
    return out

"""Canonical weights on Keras: translate layouts and names at the boundary (docs/parity.md #9)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import engine


def _same(a):
    return a


def _conv_to(a):      # HWIO -> OIHW
    return np.transpose(a, (3, 2, 0, 1))


def _conv_from(a):    # OIHW -> HWIO
    return np.transpose(a, (2, 3, 1, 0))


def _dw(a):           # (kh, kw, C, 1) <-> (C, 1, kh, kw): the permutation is its own inverse
    return np.transpose(a, (2, 3, 0, 1))


def _t(a):
    return np.transpose(a)


def _scale_to(a):     # (C,) -> (C, 1, 1): ConvNeXt's layer_scale broadcasts over NCHW
    return np.reshape(a, (-1, 1, 1))


def _scale_from(a):   # (C, 1, 1) -> (C,)
    return np.reshape(a, (-1,))


@dataclass
class Slot:
    """One canonical tensor: its Keras variable and the layout maps both ways."""

    name: str
    variable: object
    to_canonical: Callable
    from_canonical: Callable
    is_param: bool


_KINDS = {
    "conv": [("kernel", "weight", _conv_to, _conv_from, True), ("bias", "bias", _same, _same, True)],
    "depthwise": [("kernel", "weight", _dw, _dw, True), ("bias", "bias", _same, _same, True)],
    "dense": [("kernel", "weight", _t, _t, True), ("bias", "bias", _same, _same, True)],
    "bn": [("gamma", "weight", _same, _same, True), ("beta", "bias", _same, _same, True),
           ("moving_mean", "running_mean", _same, _same, False),
           ("moving_variance", "running_var", _same, _same, False)],
    "layernorm": [("gamma", "weight", _same, _same, True), ("beta", "bias", _same, _same, True)],
    "layer_scale": [("gamma", "layer_scale", _scale_to, _scale_from, True)],
    "embedding": [("embeddings", "weight", _same, _same, True)],
    "lora_dense": [("lora_A", "lora_A.weight", _t, _t, True), ("lora_B", "lora_B.weight", _t, _t, True)],
    "lora_conv": [("lora_A", "lora_A.weight", _conv_to, _conv_from, True),
                  ("lora_B", "lora_B.weight", _conv_to, _conv_from, True)],
}


def slots_for(entries) -> list[Slot]:
    slots = []
    for prefix, kind, layer in entries:
        for attr, leaf, to_c, from_c, is_param in _KINDS[kind]:
            var = getattr(layer, attr, None)
            if var is not None:
                slots.append(Slot(f"{prefix}.{leaf}", var, to_c, from_c, is_param))
    return slots


def native_slots(model) -> list[Slot]:
    """keras.applications weights keep Keras names and layouts, under 'backbone.'."""
    return [Slot("backbone." + v.path.replace("/", "."), v, _same, _same, bool(v.trainable))
            for v in model.weights]


def canonical_shapes(slots) -> dict[str, tuple]:
    return {s.name: tuple(s.to_canonical(np.zeros(tuple(s.variable.shape), dtype=np.int8)).shape)
            for s in slots}


def get_weights(slots) -> dict[str, np.ndarray]:
    return {s.name: np.array(s.to_canonical(np.asarray(s.variable.numpy()))) for s in slots}


def set_weights(slots, weights: dict) -> None:
    for s in slots:
        if s.name in weights:
            value = s.from_canonical(np.asarray(weights[s.name]))
            s.variable.assign(np.ascontiguousarray(value, dtype=s.variable.dtype))


def snapshot(slots) -> list:
    """Each variable's value as a tensor on its device. JAX arrays are immutable, so a reference
    is a snapshot; on TensorFlow a read shares the variable's buffer, which a traced step's
    update then writes in place, so the value is copied (DeepCopy, one memcpy)."""
    if not engine.TENSORFLOW:
        return [s.variable.value for s in slots]
    import tensorflow as tf
    return [tf.raw_ops.DeepCopy(x=s.variable.value.read_value()) for s in slots]


def restore(slots, snap: list) -> None:
    for s, value in zip(slots, snap):
        s.variable.assign(value)


def snapshot_weights(slots, snap: list) -> dict[str, np.ndarray]:
    return {s.name: np.array(s.to_canonical(np.asarray(value))) for s, value in zip(slots, snap)}


def apply_freeze(slots, layers, frozen: set[str]) -> None:
    """Per-variable trainable flags; a layer with every parameter frozen becomes trainable=False
    (for BatchNorm that means inference mode, as PyTorch's eval())."""
    by_var = {id(s.variable): s for s in slots}
    for s in slots:
        if s.is_param:
            s.variable.trainable = s.name not in frozen
    for layer in layers:
        params = [by_var[id(v)] for v in layer.weights if id(v) in by_var and by_var[id(v)].is_param]
        if params:
            layer.trainable = not all(p.name in frozen for p in params)
            for p in params:  # layer.trainable resets its variables' flags; restore ours
                p.variable.trainable = p.name not in frozen

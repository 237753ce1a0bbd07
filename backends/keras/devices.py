"""Devices on Keras (TensorFlow): variables are created, and every step and forward pass
runs, under `tf.device` of `m.device`; a model moves by being rebuilt there (by
tlbridge/api.py: to_device answers False)."""
from __future__ import annotations

import tensorflow as tf

from tlbridge import devices


def available() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]


def resolve(device: str) -> str:
    have = available()
    if device == "auto":
        return next((d for d in have if d != "cpu"), "cpu")
    if device == "mps":     # tensorflow-metal shows an Apple GPU as GPU:0
        device = "cuda:0" if len(have) > 1 else device
    if device == "cuda":
        device = "cuda:0"
    if device not in have:
        raise devices.unavailable(device, have, "keras (TensorFlow)")
    return device


def tf_name(device: str) -> str:
    return "/CPU:0" if device == "cpu" else f"/GPU:{device.split(':')[1]}"


def scope(device: str):
    return tf.device(tf_name(device))


def of(m) -> str:
    return tf_name(m.state.get("device", "cpu"))


def to_device(m, device: str) -> bool:
    """Variables do not move: False (tlbridge/api.py rebuilds the model under scope(device)
    with the same weights and freeze state), unless it already lives on `device`."""
    return m.state.get("device", "cpu") == device


def set_tf32(enabled) -> bool:
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(bool(enabled))
    return previous

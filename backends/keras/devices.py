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


def check_bf16(device: str) -> None:
    """bf16 on an NVIDIA GPU before Ampere (compute capability < 8.0): refused before the
    first step (no bfloat16 tensor cores; XLA and cuDNN kernels are missing or slow)."""
    if not device.startswith("cuda"):
        return
    gpus = tf.config.list_physical_devices("GPU")
    index = int(device.split(":")[1])
    details = tf.config.experimental.get_device_details(gpus[index]) if index < len(gpus) else {}
    major, minor = details.get("compute_capability", (8, 0))
    if major < 8:
        from tlbridge.errors import DataError
        raise DataError(f"Expected a GPU with bfloat16 support (NVIDIA compute capability 8.0, "
                        f"Ampere, or newer) for precision='bf16'; received {device} "
                        f"({details.get('device_name', 'GPU')}) with compute capability "
                        f"{major}.{minor}. Train with precision='fp16' (loss scaling) or 'fp32'.")

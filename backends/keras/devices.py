"""Devices on Keras (TensorFlow): variables are created, and every step and forward pass
runs, under `tf.device` of `m.device`; a model moves by being rebuilt there (by
tlbridge/api.py: to_device answers False)."""
from __future__ import annotations

import tensorflow as tf

from tlbridge import devices


_SAID = {"no_gpu": False}


def available() -> list[str]:
    gpus = len(tf.config.list_physical_devices("GPU"))
    if not gpus and not _SAID["no_gpu"]:
        _say_when_torch_sees_a_gpu()
    return ["cpu"] + [f"cuda:{i}" for i in range(gpus)]


def _say_when_torch_sees_a_gpu() -> None:
    """Plain `tensorflow` is the CPU build: on a GPU machine Keras models silently stay on the
    CPU, and TensorFlow's own warning is hidden (TF_CPP_MIN_LOG_LEVEL=3). Said once, in one
    line, when torch (already imported) sees a GPU."""
    import sys
    import warnings
    torch = sys.modules.get("torch")
    if torch is None:       # asked again at the next model, once torch is imported
        return
    _SAID["no_gpu"] = True
    try:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:       # a broken CUDA install: torch's own warning says so
        gpus = 0
    if gpus:
        warnings.warn(f"TensorFlow sees no GPU while torch sees {gpus}: Keras models stay on "
                      f"the CPU; install TensorFlow's CUDA build: pip install "
                      f"\"tlbridge[gpu]\" (tensorflow[and-cuda]).", RuntimeWarning, stacklevel=3)


def grow_gpu_memory() -> None:
    """Allocate GPU memory as needed, not all at TensorFlow's first allocation, so torch in the
    same process (parity helpers, convert, benchmarks/gpu_check.py) keeps room. Runs at backend
    start, before TensorFlow initialises its GPUs; TF_FORCE_GPU_ALLOW_GROWTH=false opts out,
    and a TensorFlow already running keeps what it has."""
    import os
    if os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "false":
        return
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):      # already initialised, or a virtual device
            return


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

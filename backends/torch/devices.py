"""Devices on PyTorch: parameters, batches, anchors and optimizer state live on `m.device`."""
from __future__ import annotations

import contextlib

import torch

from tlbridge import devices, parallel


def available() -> list[str]:
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve(device: str) -> str:
    """A normalised tlbridge device name -> the one this machine has ("auto": a GPU when there
    is one; "cuda" and "auto" take this rank's own GPU under torchrun: LOCAL_RANK)."""
    have = available()
    gpus = sum(d.startswith("cuda:") for d in have)
    if device == "auto":
        device = "cuda" if gpus else next((d for d in have if d != "cpu"), "cpu")
    if device == "cuda" and gpus:
        return f"cuda:{parallel.local_gpu(gpus)}"
    if device == "cuda":
        device = "cuda:0"       # refused below, naming what the machine has
    if device not in have:
        raise devices.unavailable(device, have, "torch")
    return device


def scope(device: str):
    """Build under this (torch builds on the CPU and moves the model after)."""
    return contextlib.nullcontext()


def to_device(m, device: str) -> bool:
    """Parameters and buffers move in place: True (the contract's "moved")."""
    m.native.to(torch.device(device))
    m.state["device"] = device
    return True


def _new_api() -> bool:
    """torch >= 2.9 sets TF32 per backend and operator (`fp32_precision`); once that API is
    used, reading the legacy `allow_tf32` flags raises ("mix of the legacy and new APIs")."""
    return isinstance(getattr(torch.backends.cuda.matmul, "fp32_precision", None), str)


def tf32_enabled() -> tuple[bool, bool]:
    """(matmul, convolution) TF32 allowed, read with the API torch wants."""
    if _new_api():
        return (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32")
    return torch.get_float32_matmul_precision() != "highest", torch.backends.cudnn.allow_tf32


def set_tf32(enabled):
    """Returns the previous state exactly as torch held it (restored by passing it back);
    `enabled` a bool or such a state. torch's own precision API only: the user's
    set_float32_matmul_precision("medium") survives a set/restore round trip."""
    if _new_api():
        return _set_fp32_precision(enabled)
    previous = ("legacy", torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    if isinstance(enabled, tuple):
        torch.set_float32_matmul_precision(enabled[1])
        torch.backends.cudnn.allow_tf32 = bool(enabled[2])
    else:
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = bool(enabled)
    return previous


def _fp32_knobs() -> list:
    """CUDA matmul, cuDNN conv, then oneDNN matmul and conv: torch's "medium" matmul precision
    also turns CPU float32 matmuls into bf16 ones on AMX/AVX512-BF16 CPUs (1e-1 errors)."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return knobs + [k for k in (getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None))
                    if isinstance(getattr(k, "fp32_precision", None), str)]


def _set_fp32_precision(enabled):
    """Forbidding TF32 means IEEE float32 everywhere (oneDNN's bf16 too); allowing it touches
    only the GPU knobs, the CPU's reduced modes stay the user's."""
    knobs = _fp32_knobs()
    previous = ("fp32_precision",) + tuple(k.fp32_precision for k in knobs)
    if isinstance(enabled, tuple):
        for knob, value in zip(knobs, enabled[1:]):
            knob.fp32_precision = value
    else:
        for knob in knobs[:2] if enabled else knobs:
            knob.fp32_precision = "tf32" if enabled else "ieee"
    return previous

"""Devices on PyTorch: parameters, batches, anchors and optimizer state live on `m.device`."""
from __future__ import annotations

import contextlib

import torch

from tlbridge import devices


def available() -> list[str]:
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve(device: str) -> str:
    """A normalised tlbridge device name -> the one this machine has ("auto": first GPU)."""
    have = available()
    if device == "auto":
        return next((d for d in have if d != "cpu"), "cpu")
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


def set_tf32(enabled):
    """Returns the previous (matmul, cudnn) flags; `enabled` a bool or such a pair."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    matmul, conv = enabled if isinstance(enabled, tuple) else (enabled, enabled)
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(conv)
    return previous

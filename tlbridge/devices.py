"""Device names tlbridge accepts, the same on both backends: "auto", "cpu", "cuda", "cuda:N",
"mps". Each backend resolves them against what its framework sees (backends/*/devices.py) to
"cpu", "cuda:N" or "mps", which `m.device` reports.

TF32 (NVIDIA Ampere and later): torch leaves it off for matmuls and on for cuDNN convolutions;
TensorFlow turns it on for both. Its 10-bit mantissa moves float32 results by ~1e-3, so the
parity helpers (tl.parity) switch it off on both frameworks while they compare
(`precision(tf32=False)`); elsewhere `set_precision` is the user's choice.
"""
from __future__ import annotations

import contextlib
import re

from .errors import DataError

_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def normalize(device) -> str:
    if not isinstance(device, str) or not _NAME.match(device.strip().lower()):
        raise DataError(f"Expected device as 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; received "
                        f"{device!r}.")
    device = device.strip().lower()
    return "cuda:0" if device == "cuda" else device


def unavailable(device: str, available: list[str], backend: str):
    from .errors import DeviceNotAvailableError
    return DeviceNotAvailableError(
        f"Expected a device {backend} can use; received device={device!r}, but it sees "
        f"{available}. Pass one of those, or device='auto' (the first GPU when there is one, "
        f"else the CPU).")


def set_precision(tf32: bool) -> dict:
    """Allow (True) or forbid (False) TF32 in float32 matmuls and convolutions, on every
    backend already imported; returns the previous settings for `restore_precision`."""
    import sys

    from . import registry
    previous = {}
    for name in ("torch", "keras"):
        module = {"torch": "torch", "keras": "tensorflow"}[name]
        if module in sys.modules:
            previous[name] = registry.load(name).set_tf32(bool(tf32))
    return previous


def restore_precision(previous: dict) -> None:
    from . import registry
    for name, state in previous.items():
        registry.load(name).set_tf32(state)


@contextlib.contextmanager
def precision(tf32: bool = False):
    """TF32 allowed or not inside the block (parity comparisons run with it off)."""
    previous = set_precision(tf32)
    try:
        yield
    finally:
        restore_precision(previous)

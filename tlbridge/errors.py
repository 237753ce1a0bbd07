"""Exceptions of tlbridge.

Each one is also the builtin type a caller would catch without knowing tlbridge
(ValueError, KeyError, ImportError), and each message says what was expected,
what was received, and how to fix it.
"""
from __future__ import annotations

__all__ = [
    "TLBridgeError",
    "UnknownBackendError",
    "BackendNotInstalledError",
    "UnknownBackboneError",
    "NotPortableError",
    "ShapeError",
    "DataError",
    "WeightsMismatchError",
    "CheckpointError",
    "FreezeSpecError",
    "TrainingDivergedError",
]


class TLBridgeError(Exception):
    """Base class of every error tlbridge raises on purpose."""


class UnknownBackendError(TLBridgeError, ValueError):
    pass


class BackendNotInstalledError(TLBridgeError, ImportError):
    pass


class UnknownBackboneError(TLBridgeError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NotPortableError(TLBridgeError, ValueError):
    pass


class ShapeError(TLBridgeError, ValueError):
    pass


class DataError(TLBridgeError, ValueError):
    pass


class WeightsMismatchError(TLBridgeError, ValueError):
    """Weights of another architecture: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class CheckpointError(TLBridgeError, ValueError):
    """A weights file that cannot be read: truncated, not safetensors, bad spec."""


class FreezeSpecError(TLBridgeError, ValueError):
    pass


class TrainingDivergedError(TLBridgeError, RuntimeError):
    """A NaN/inf loss: names the epoch and step; the model is restored to its last good state."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step

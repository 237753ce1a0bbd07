"""Exceptions of tlbridge.

Each one is also the builtin type a caller would catch without knowing tlbridge
(ValueError, TypeError, KeyError, ImportError, NotImplementedError, OSError), and each message says what was expected,
what was received, and how to fix it.
"""
from __future__ import annotations

__all__ = [
    "TLBridgeError",
    "AdapterError",
    "ArgumentTypeError",
    "UnknownOptionError",
    "UnknownBackendError",
    "BackendNotInstalledError",
    "UnknownBackboneError",
    "NotPortableError",
    "ShapeError",
    "DataError",
    "WeightsMismatchError",
    "CheckpointError",
    "FreezeSpecError",
    "FreezeSpecTypeError",
    "NoHeadError",
    "NoPretrainedWeightsError",
    "UnsupportedLayerError",
    "EngineFeatureError",
    "TrainingDivergedError",
    "DeviceNotAvailableError",
    "DistributedError",
    "WeightsDownloadError", "ExportError", "CompileError",
]


class TLBridgeError(Exception):
    """Base class of every error tlbridge raises on purpose."""


class ArgumentTypeError(TLBridgeError, TypeError):
    """An argument of the wrong type: not a TransferModel, weights neither None, 'imagenet'
    nor a path."""


class UnknownOptionError(ArgumentTypeError):
    """A builder option the backbone does not take (Python says TypeError for an unexpected
    keyword argument)."""


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


class FreezeSpecTypeError(FreezeSpecError, TypeError):
    """A freeze spec that is not a string or a list of strings (None, a number): a
    FreezeSpecError that is also a TypeError."""


class NoHeadError(TLBridgeError, ValueError):
    """logits/predict/loss/fine_tune on a backbone without a head (call tl.replace_head)."""


class NoPretrainedWeightsError(TLBridgeError, ValueError):
    """weights='imagenet' for a backbone that has no pretrained weights (seed_vgg)."""


class UnsupportedLayerError(TLBridgeError, NotImplementedError):
    """A layer the backend cannot mirror yet (e.g. a grouped convolution on Keras)."""


class EngineFeatureError(TLBridgeError, NotImplementedError):
    """A feature Keras' current engine (KERAS_BACKEND=jax) does not run in tlbridge yet: names
    the feature and the engine that has it."""


class AdapterError(TLBridgeError, ValueError):
    """LoRA adapters asked for where they cannot go (tlbridge/lora.py): no such layer, a bad
    rank, a layer adapted twice, a merge without adapters, adapter files for another base."""


class TrainingDivergedError(TLBridgeError, RuntimeError):
    """A NaN/inf loss: names the epoch and step; the model is restored to its last good state."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class DeviceNotAvailableError(TLBridgeError, ValueError):
    """A device this machine (or this backend) does not have: names the ones it has."""


class DistributedError(TLBridgeError, RuntimeError):
    """Data-parallel training could not start or go on (a launch without torchrun's
    variables, more replicas than devices, a rank that stopped): says which, and the fix."""


class WeightsDownloadError(TLBridgeError, OSError):
    """Pretrained weights could not be fetched (no network, a proxy, a server error)."""


class ExportError(TLBridgeError, RuntimeError):
    """An export tlbridge cannot write, or one whose outputs differ from the model's."""


class CompileError(TLBridgeError, RuntimeError):
    """fine_tune(compile=True) where the compiler toolchain is missing (torch.compile's
    inductor needs a C++ compiler on the CPU, Triton on a GPU): names what to install, or
    compile=False."""

"""tlbridge: one transfer-learning API, implemented natively for PyTorch and for Keras 3.

Importing tlbridge imports no framework; a backend is imported the first time a model
needs it, so both can live side by side in one process.
"""
from __future__ import annotations

from . import data, errors, losses, optim, parity
from .api import (bce_loss_and_grads, convert, features, freeze, get_weights, list_backbones,
                  loss_and_grads, set_precision, to_device,
                  preprocessing_of,
                  load, load_backbone, logits, predict, preprocess, replace_head, save,
                  set_weights, trainable_names, unfreeze)
from .exporting import export
from .lora import add_lora, merge_lora
from .lora_files import load_adapters, save_adapters
from .fewshot import few_shot_eval, linear_probe, prototype_head, transfer_labels
from .fusion import FusedModel, fuse, gate_weights
from .soup import soup
from .config import available_backends, get_backend, set_backend, use_backend
from .history import History
from .model import TransferModel
from .multitask import replace_heads
from .optim import L2SP
from .training import Checkpoint, EarlyStopping, Parallel, compile, evaluate, fine_tune
from .text import tokenize
from .zeroshot import zero_shot_head

__version__ = "0.1.0"

__all__ = [
    "available_backends", "get_backend", "set_backend", "use_backend",
    "list_backbones", "load_backbone", "replace_head", "replace_heads", "freeze", "unfreeze", "trainable_names",
    "features", "logits", "predict", "bce_loss_and_grads", "loss_and_grads",
    "get_weights", "set_weights", "convert", "save", "load", "to_device", "set_precision", "preprocess", "preprocessing_of",
    "tokenize", "zero_shot_head", "add_lora", "merge_lora", "export",
    "save_adapters", "load_adapters",
    "fine_tune", "compile", "evaluate", "prototype_head", "linear_probe", "few_shot_eval", "transfer_labels",
    "fuse", "FusedModel", "gate_weights", "soup", "History", "EarlyStopping", "L2SP", "Checkpoint", "Parallel",
    "TransferModel", "data", "errors", "losses", "optim", "parity", "__version__",
]


def __getattr__(name: str):
    """`tl.backends` on first use (its frameworks load only when one is named)."""
    if name == "backends":
        import importlib
        return importlib.import_module("tlbridge.backends")
    raise AttributeError(f"module 'tlbridge' has no attribute {name!r}")

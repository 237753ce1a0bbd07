"""Backends registered as dotted module paths, imported on first use (the fsspec habit).

Nothing here imports a framework; `importlib.util.find_spec` answers "installed?"
without importing it. What a registered package must implement: backends/contract.py
(tlbridge.backends.contract).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType

from .errors import BackendNotInstalledError


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str           # the tlbridge backend package
    requires: tuple       # top-level framework modules it needs
    install_hint: str


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("torch", "tlbridge.backends.torch", ("torch", "torchvision"),
                          'pip install "tlbridge[torch]"'),
    "keras": BackendEntry("keras", "tlbridge.backends.keras", ("keras", "tensorflow"),
                          'pip install "tlbridge[keras]"'),
}

_loaded: dict[str, ModuleType] = {}
ON_LOAD: list = []          # called with (name, module) when a backend is first imported


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a broken or deliberately hidden install
        return False


KERAS_ENGINES = {"tensorflow": 'pip install "tlbridge[keras]"', "jax": 'pip install "tlbridge[jax]"'}


def keras_engine() -> str:
    """The engine Keras runs on: Keras' own switch (KERAS_BACKEND, read when keras is first
    imported; tensorflow unless set), or the engine of a keras already imported."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def _requires(name: str) -> tuple[tuple, str]:
    """(modules needed, install hint): the Keras backend needs its engine, not TensorFlow."""
    entry = BACKENDS[name]
    if name != "keras":
        return entry.requires, entry.install_hint
    engine = keras_engine()
    return ("keras", engine), KERAS_ENGINES.get(engine, entry.install_hint)


def is_installed(name: str) -> bool:
    return all(_has(req) for req in _requires(name)[0])


def load(name: str) -> ModuleType:
    """Import the backend package for `name` (already validated) the first time it is needed."""
    if name in _loaded:
        return _loaded[name]
    entry = BACKENDS[name]
    requires, hint = _requires(name)
    missing = [req for req in requires if not _has(req)]
    if missing:
        raise BackendNotInstalledError(
            f"The {name!r} backend needs {', '.join(missing)}, which is not installed. "
            f"Install it with: {hint}"
        )
    _guard_import_order(name)
    module = importlib.import_module(entry.module)
    _loaded[name] = module
    for hook in ON_LOAD:        # tlbridge/devices.py: TF32 as tl.set_precision chose
        hook(name, module)
    return module


def _guard_import_order(name: str) -> None:
    """Keep torch and TensorFlow importable into one process, in either order.

    CUDA builds of torch ship Triton, whose libtriton and TensorFlow both carry LLVM:
    loading libtriton *after* TensorFlow segfaults (seen with torch 2.14 + TF 2.21).
    Loaded first, both work; so the Keras backend loads libtriton (a ~0.1 s native
    library, not torch) before TensorFlow when Triton is installed. If TensorFlow is
    already in the process, the torch backend switches Triton off instead (torch then
    runs without Triton kernels) and says so.
    """
    if not _has("triton") or "triton._C.libtriton" in sys.modules:
        return
    if name == "keras" and "tensorflow" not in sys.modules and keras_engine() == "tensorflow":
        try:
            importlib.import_module("triton._C.libtriton")
        except Exception:  # a broken Triton must not stop the Keras backend
            pass
    elif name == "torch" and "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # makes `import triton` raise ImportError: torch skips it
        warnings.warn(
            "TensorFlow was imported before PyTorch; importing Triton now would crash the "
            "process (both bundle LLVM), so tlbridge disabled Triton for this process. To keep "
            "it, import torch (or use tlbridge's torch backend) before TensorFlow.",
            RuntimeWarning, stacklevel=3)

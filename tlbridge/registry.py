"""Backends registered as dotted module paths, imported on first use (the fsspec habit).

Nothing here imports a framework; `importlib.util.find_spec` answers "installed?"
without importing it.
"""
from __future__ import annotations

import importlib
import importlib.util
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


def is_installed(name: str) -> bool:
    return all(importlib.util.find_spec(req) is not None for req in BACKENDS[name].requires)


def load(name: str) -> ModuleType:
    """Import the backend package for `name` (already validated) the first time it is needed."""
    if name in _loaded:
        return _loaded[name]
    entry = BACKENDS[name]
    missing = [req for req in entry.requires if importlib.util.find_spec(req) is None]
    if missing:
        raise BackendNotInstalledError(
            f"The {name!r} backend needs {', '.join(missing)}, which is not installed. "
            f"Install it with: {entry.install_hint}"
        )
    module = importlib.import_module(entry.module)
    _loaded[name] = module
    return module

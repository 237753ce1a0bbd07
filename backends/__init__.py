"""tlbridge's backends (installed as tlbridge.backends): one package per framework, imported on
first use, e.g. `tl.backends.keras.cpu_replicas(2)` imports the Keras backend there."""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name in ("torch", "keras"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

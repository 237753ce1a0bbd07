"""Backend choice: set_backend() > TLBRIDGE_BACKEND > default (torch if installed, else keras).

Resolved lazily at first use and never written anywhere, unlike Keras' import-time
config. Every call may also name a backend explicitly, so both can live in one process.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from .errors import BackendNotInstalledError, UnknownBackendError
from .registry import BACKENDS, is_installed

ENV_VAR = "TLBRIDGE_BACKEND"
_state = threading.local()
_explicit: list[str] = []  # process-wide set_backend() value (a list so it is mutable)


def validate(name: object, source: str = "argument") -> str:
    """Return the canonical backend name or raise UnknownBackendError naming the source."""
    valid = sorted(BACKENDS)
    if isinstance(name, str) and name.strip().lower() in BACKENDS:
        return name.strip().lower()
    where = f"environment variable {ENV_VAR}={name!r}" if source == "env" else f"backend={name!r}"
    raise UnknownBackendError(
        f"Unknown backend {name!r}. Expected one of {valid}. Received: {where}. "
        f"Set {ENV_VAR} to one of {valid} or pass backend= one of them."
    )


def available_backends() -> list[str]:
    """Backends whose framework is installed (checked without importing it)."""
    return [name for name in sorted(BACKENDS) if is_installed(name)]


def get_backend() -> str:
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _explicit:
        return _explicit[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return validate(env, source="env")
    for name in ("torch", "keras"):
        if is_installed(name):
            return name
    raise BackendNotInstalledError(
        "No backend is installed. Expected torch+torchvision, keras+tensorflow or keras+jax "
        "(KERAS_BACKEND=jax). Install one with: pip install \"tlbridge[torch]\", "
        'pip install "tlbridge[keras]" or pip install "tlbridge[jax]"'
    )


def set_backend(name: str) -> None:
    """Override TLBRIDGE_BACKEND for this process."""
    _explicit[:] = [validate(name)]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Temporarily use `name` in this thread."""
    name = validate(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def resolve(name: str | None) -> str:
    return get_backend() if name is None else validate(name)

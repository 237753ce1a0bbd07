"""A batch of model inputs as numpy: one array for a model with one input (images, as
always), a dict {input name: array} for a model with several (token ids and their attention
mask). Everything between the data and the backend slices, casts and joins batches through
these few functions, so it never asks what kind of model it feeds."""
from __future__ import annotations

import numpy as np


def is_multi(x) -> bool:
    return isinstance(x, dict)


def length(x) -> int:
    """The number of samples."""
    return len(next(iter(x.values()))) if is_multi(x) else len(x)


def rows(x, idx):
    """Samples `idx` (a slice, an index array or a boolean mask) of every input."""
    return {k: v[idx] for k, v in x.items()} if is_multi(x) else x[idx]


def cast(x, dtype: str):
    """Float inputs in the model's dtype; integer inputs (token ids, masks) stay int64."""
    def one(v):
        return v.astype(dtype, copy=False) if np.issubdtype(v.dtype, np.floating) else v
    return {k: one(v) for k, v in x.items()} if is_multi(x) else one(x)


def concat(batches: list):
    if batches and is_multi(batches[0]):
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return np.concatenate(batches)


def shapes(x) -> dict:
    """{name: per-sample shape} ("x" for a single array)."""
    return {k: tuple(v.shape[1:]) for k, v in x.items()} if is_multi(x) else {"x": tuple(x.shape[1:])}


def digest(x, h) -> None:
    """Feed up to 256 evenly spaced samples of every input to the hash `h` (fingerprints)."""
    for v in (x.values() if is_multi(x) else [x]):
        v = np.asarray(v)
        h.update(f"{v.shape}{v.dtype}".encode())
        idx = np.unique(np.linspace(0, len(v) - 1, num=min(len(v), 256)).astype(int)) if len(v) else []
        for i in idx:
            h.update(np.ascontiguousarray(v[i]).tobytes())

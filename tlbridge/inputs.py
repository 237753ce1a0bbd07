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
    """One set of samples from several; token batches of different widths are padded (with
    masked zeros) to the widest."""
    if batches and is_multi(batches[0]):
        widths = {b["attention_mask"].shape[1] for b in batches if "attention_mask" in b}
        if len(widths) > 1:
            widest = max(widths)
            batches = [{k: np.pad(v, ((0, 0), (0, widest - v.shape[1]))) for k, v in b.items()}
                       for b in batches]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return np.concatenate(batches)


def trim(x):
    """Token inputs without their trailing columns of padding only (the mask is 0 there in
    every row): the same features and gradients (padding is masked), shorter steps."""
    if not is_multi(x) or "attention_mask" not in x or np.ndim(x["attention_mask"]) != 2:
        return x
    mask = np.asarray(x["attention_mask"])
    real = np.nonzero(mask.any(axis=0))[0]
    width = int(real[-1]) + 1 if len(real) else mask.shape[1]
    if width == mask.shape[1]:
        return x
    return {k: (v[:, :width] if np.ndim(v) == 2 and v.shape[1] == mask.shape[1] else v)
            for k, v in x.items()}


def shapes(x) -> dict:
    """{name: per-sample shape} ("x" for a single array)."""
    return {k: tuple(v.shape[1:]) for k, v in x.items()} if is_multi(x) else {"x": tuple(x.shape[1:])}


ROW_SAMPLES = 32        # values per row that identify it
ROW_DECIMALS = 3        # rounded: a float32 copy of float64 rows hashes alike


def row_hashes(x) -> np.ndarray:
    """A 64-bit identity per row, by content: up to ROW_SAMPLES evenly spaced values of the row
    (every input's, side by side), rounded to ROW_DECIMALS, hashed. The same rows in another
    dtype, order or subset give the same hashes (fusion's "own training data" guard). Token
    rows hash their real tokens only, so any padding gives the same hash."""
    import hashlib
    if is_multi(x) and {"input_ids", "attention_mask"} <= set(x):   # tokens: padding is no content
        ids, mask = np.asarray(x["input_ids"]), np.asarray(x["attention_mask"]).astype(bool)
        return np.array([int.from_bytes(hashlib.blake2b(ids[i][mask[i]].astype(np.int64).tobytes(),
                                                        digest_size=8).digest(), "little")
                         for i in range(len(ids))], dtype=np.uint64)
    parts = []
    for v in (x.values() if is_multi(x) else [x]):
        flat = np.asarray(v).reshape(len(v), -1)
        cols = np.unique(np.linspace(0, flat.shape[1] - 1, num=min(flat.shape[1], ROW_SAMPLES))
                         .astype(int))
        parts.append(np.round(flat[:, cols].astype(np.float64), ROW_DECIMALS) + 0.0)  # no -0.0
    rows = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
                     for r in rows], dtype=np.uint64)


def overlap(x, hashes) -> float:
    """The fraction of x's rows whose content is among `hashes`."""
    if hashes is None or not len(hashes):
        return 0.0
    return float(np.mean(np.isin(row_hashes(x), np.asarray(hashes, np.uint64))))

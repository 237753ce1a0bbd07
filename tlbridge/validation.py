"""Input checks shared by both backends, so both reject the same things with the same words."""
from __future__ import annotations

import numpy as np

from .errors import DataError, ShapeError


def check_images(x, input_shape: tuple, dtype: str, what: str = "x") -> np.ndarray:
    """NHWC float images matching the model's input shape, finite, cast to the model dtype."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise DataError(f"Expected {what} as a numpy array of images (N, H, W, C); "
                            f"received {type(x).__name__}.") from exc
    h, w, c = input_shape
    expected = f"(N, {h}, {w}, {c}) NHWC"
    if x.ndim != 4:
        raise ShapeError(
            f"Expected {what} of shape {expected}; received an array of shape {x.shape} "
            f"({x.ndim}-D). Add a batch axis with x[None] for a single image.")
    if x.shape[0] == 0:
        raise ShapeError(f"Expected {what} of shape {expected} with N >= 1; received an empty batch.")
    if x.shape[1:] != (h, w, c):
        hint = ""
        if x.shape[1] == c and x.shape[3] != c:
            hint = " It looks channels-first (NCHW); pass x.transpose(0, 2, 3, 1)."
        elif x.shape[3] != c:
            hint = f" The model takes {c} channel(s); convert your images (e.g. grey -> RGB)."
        else:
            hint = (f" Resize the images to {h}x{w}, or load the backbone with "
                    f"input_shape={tuple(x.shape[1:])}.")
        raise ShapeError(f"Expected {what} of shape {expected}; received {x.shape}.{hint}")
    if not np.issubdtype(x.dtype, np.floating):
        if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
            raise DataError(
                f"Expected {what} as float images already normalised for the backbone; received "
                f"dtype {x.dtype}. Use tl.preprocess(model, images) for uint8 images.")
        raise DataError(f"Expected {what} with a float dtype; received dtype {x.dtype}.")
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"Expected finite values in {what}; received {bad} NaN/inf value(s). "
                        f"Clean or drop those images first.")
    return np.ascontiguousarray(x, dtype=dtype)


def check_labels(y, n: int, k: int, dtype: str) -> np.ndarray:
    """Binary labels of shape (N, K) (or (N,) when K == 1), values in {0, 1}."""
    y = np.asarray(y)
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.shape != (n, k):
        raise ShapeError(
            f"Expected labels y of shape ({n}, {k}) (one column per model output"
            f"{', or (N,) for one output' if k == 1 else ''}); received {y.shape}.")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"Expected numeric labels in {{0, 1}}; received dtype {y.dtype}.")
    y = y.astype(dtype)
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        sample = np.unique(y[bad])[:5].tolist()
        raise DataError(
            f"Expected labels in {{0, 1}} for binary cross-entropy; received {int(bad.sum())} "
            f"value(s) outside it, e.g. {sample}. One-hot encode class indices first.")
    return np.ascontiguousarray(y)


def check_inputs(x, signature: tuple, dtype: str, what: str = "x"):
    """x in the form the backend takes for a model with these declared inputs
    (specs.InputSpec): one array for a single input (a dict {name: array} is accepted too),
    a dict of every named input otherwise; each checked by its kind, floats cast to `dtype`."""
    if len(signature) == 1:
        spec = signature[0]
        if isinstance(x, dict):
            if set(x) != {spec.name}:
                raise DataError(f"Expected {what} as an array, or a dict with the one input "
                                f"{spec.name!r}; received a dict of {sorted(x)}.")
            x = x[spec.name]
        return _check_one(x, spec, dtype, what)
    names = [s.name for s in signature]
    if not isinstance(x, dict):
        raise DataError(f"Expected {what} as a dict of the model's inputs {names}; received "
                        f"{type(x).__name__}. Pass {{{', '.join(repr(n) + ': ...' for n in names)}}}.")
    missing, unknown = [n for n in names if n not in x], sorted(set(x) - set(names))
    if missing or unknown:
        raise DataError(f"Expected {what} with exactly the model's inputs {names}; received "
                        f"{sorted(x)} (missing {missing}, unknown {unknown}).")
    out = {s.name: _check_one(x[s.name], s, dtype, f"{what}[{s.name!r}]") for s in signature}
    n = {len(v) for v in out.values()}
    if len(n) != 1:
        raise ShapeError(f"Expected one row per sample in every input of {what}; received "
                         f"{ {k: len(v) for k, v in out.items()} } rows.")
    return out


def _check_one(x, spec, dtype: str, what: str) -> np.ndarray:
    if spec.kind == "image":
        return check_images(x, spec.shape, dtype, what)
    x = np.asarray(x)
    want = f"(N, {', '.join('L' if d is None else str(d) for d in spec.shape)})"
    if x.ndim != len(spec.shape) + 1 or x.shape[0] == 0 or any(
            d is not None and d != got for d, got in zip(spec.shape, x.shape[1:])):
        raise ShapeError(f"Expected {what} of shape {want} with N >= 1; received {x.shape}.")
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise DataError(f"Expected {what} as integers ({spec.kind}); received dtype {x.dtype}. "
                        f"Tokenize the texts first (token ids and a 0/1 attention mask).")
    x = x.astype(np.int64)
    if spec.longest is not None and x.shape[1] > spec.longest:
        raise ShapeError(f"Expected {what} of at most {spec.longest} positions (the model's "
                         f"position table); received {x.shape[1]}. Tokenize with a smaller "
                         f"max_length (tl.tokenize(m, texts, max_length={spec.longest})).")
    if spec.kind == "mask":
        bad = (x != 0) & (x != 1)
        if bad.any():
            raise DataError(f"Expected {what} in {{0, 1}} (1 for a real token, 0 for padding); "
                            f"received {np.unique(x[bad])[:5].tolist()}.")
        if not x.any(axis=tuple(range(1, x.ndim))).all():
            raise DataError(f"Expected at least one real token (mask 1) in every row of {what}; "
                            f"received {int((~x.any(axis=1)).sum())} row(s) of padding only.")
    elif x.min() < 0 or (spec.high is not None and x.max() >= spec.high):
        bad = x[(x < 0) | (x >= (spec.high or np.iinfo(np.int64).max))]
        raise DataError(f"Expected {what} as token ids in [0, {spec.high}); received "
                        f"{np.unique(bad)[:5].tolist()}. Use the model's own tokenizer.")
    return np.ascontiguousarray(x)

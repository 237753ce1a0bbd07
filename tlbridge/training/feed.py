"""What the trainer feeds the model: the data as a tl.data dataset checked against the model
and its loss, and the feature cache (backbone features computed once, by sample index)."""
from __future__ import annotations

import numpy as np

from .. import api, data as tldata, inputs
from ..errors import DataError, ShapeError


def as_dataset(d, batch_size, shuffle, seed, dtype, what, m=None, loss=None) -> tldata.Dataset:
    """A tl.data dataset from (x, y) arrays (labels packed for the loss: a dict of task labels
    becomes one array), or the dataset itself in the model's dtype."""
    if isinstance(d, tldata.Dataset):
        d.dtype = dtype
        return d
    if isinstance(d, (tuple, list)) and len(d) == 2 and m is not None and (
            isinstance(d[1], dict) or loss is not None and loss.name == "multi"):
        d = (d[0], api.labels_for(m, d[1], inputs.length(d[0]), loss, f"{what} labels"))
    if isinstance(d, (tuple, list)) and len(d) == 2:
        return tldata.arrays(d[0], d[1], batch_size=batch_size, shuffle=shuffle, seed=seed, dtype=dtype)
    raise DataError(f"Expected {what} as an (x, y) pair of numpy arrays or a tl.data dataset; "
                    f"received {type(d).__name__}.")


def check_data(m, ds: tldata.Dataset, what: str, loss) -> tldata.Dataset:
    """The data must fit the model before any work is done: labels in the loss's form (a
    shallow copy when they change) and inputs as the model declares them."""
    ds = loss.fit_dataset(ds, m.num_outputs, what)
    signature = getattr(m, "inputs", None)
    if signature is None or m.input_shape is None:      # members map the inputs themselves
        return ds
    if len(signature) == 1 and signature[0].kind == "image":
        if ds.image_shape != tuple(m.input_shape):
            got = ds.image_shape if ds.image_shape is not None else ds.input_shapes
            raise DataError(
                f"Expected {what} images of shape {tuple(m.input_shape)} (the model's "
                f"input_shape); received {got}. Resize the images (image_folder's image_size), "
                f"or load the backbone with input_shape={got}.")
        return ds
    _check_named(signature, ds.input_shapes, what)
    return ds


def _check_named(signature, shapes: dict, what: str) -> None:
    names = [s.name for s in signature]
    if sorted(shapes) != sorted(names):
        got = (f"one array of per-sample shape {shapes['x']}" if list(shapes) == ["x"]
               else f"{sorted(shapes)}")
        raise DataError(f"Expected {what} inputs {names} (the model's); received {got}. "
                        f"Pass x as a dict {{{', '.join(repr(n) + ': ...' for n in names)}}}.")
    for spec in signature:
        got = shapes[spec.name]
        if len(got) != len(spec.shape) or any(d is not None and d != g
                                              for d, g in zip(spec.shape, got)):
            want = tuple("L" if d is None else d for d in spec.shape)
            raise DataError(f"Expected {what} input {spec.name!r} of per-sample shape {want}; "
                            f"received {got}.")
        if spec.longest is not None and got and got[0] is not None and got[0] > spec.longest:
            raise ShapeError(f"Expected {what} input {spec.name!r} of at most {spec.longest} "
                             f"positions (the model's position table); received {got[0]}. "
                             f"Tokenize with max_length <= {spec.longest}.")


def feature_cache(m, ds: tldata.Dataset):
    """Backbone features of every sample, computed one batch at a time and stored by sample
    index; `valid` marks the samples whose input decoded (on_error="skip" leaves some out)."""
    feats, valid = None, np.zeros(ds.num_samples, bool)
    for idx, xb, _ in ds.indexed_batches():
        f = api.features(m, xb, batch_size=ds.batch_size)
        if feats is None:
            feats = np.zeros((ds.num_samples, *f.shape[1:]), f.dtype)
        feats[idx] = f
        valid[idx] = True
    if feats is None:
        raise DataError(f"Expected at least one readable image; received none of "
                        f"{ds.num_samples} (see ds.skipped).")
    return feats, valid


def batches(ds: tldata.Dataset, epoch: int, cache):
    """The epoch's batches; from the cache, the same samples in the same order as ds.epoch
    (inputs that failed to decode are left out of their batch, empty batches skipped)."""
    if cache is None:
        yield from ds.epoch(epoch)
        return
    feats, valid = cache
    order, _ = ds.plan(epoch)
    b = ds.batch_size
    for k in range(len(ds)):
        idx = order[k * b:(k + 1) * b]
        idx = idx[valid[idx]]
        if len(idx):
            yield feats[idx], ds.labels[idx]

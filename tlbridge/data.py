"""The data layer of fine-tuning: batching, shuffling and augmentation in numpy, driven by a seed.

Both backends must see exactly the same batches in the same order, so everything random
happens here and nowhere else.

Determinism. Epoch ``e`` of a dataset with seed ``s`` uses one generator,
``np.random.default_rng([s, e])``, and draws from it up front, in the consumer's thread and
in a fixed order: first the permutation of the samples (only when ``shuffle``), then the
augmentation parameters of every *position* of the epoch (``Augment.sample``: always the
same number of draws, whichever parts of the augmentation are switched on). Batch ``b`` is
then a pure function of (positions ``b*B .. b*B+B-1``, their parameters), so

* epoch ``e`` does not depend on earlier epochs (resume with ``ds.epoch(e, start_batch=k)``,
  which skips batches without decoding them);
* background threads (``workers``, ``prefetch``) change the speed, never the numbers.

Images from folders are decoded lazily, one batch at a time; only the file headers are read
when the dataset is built (to find unreadable files early). Pillow is imported only then.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np

from . import inputs, text
from .errors import ArgumentTypeError, BackendNotInstalledError, DataError, ShapeError

__all__ = ["Augment", "Dataset", "arrays", "image_folder", "texts", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_DTYPES = ("float32", "float64")
_ATTEMPTS = 10  # RandomResizedCrop's tries at a crop that fits before falling back
_CHUNK_PIXELS = 32768  # images warped together, so that the temporaries stay in cache


# ----------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class Augment:
    """Random flip + RandomResizedCrop-like crop + small rotation, as one affine map per image.

    flip: horizontal flip with p=0.5. crop_scale: (min, max) fraction of the image area kept
    by the crop (None: no crop), aspect ratio drawn log-uniformly in ``ratio``; the crop is
    resized back to the image size. rotation: maximum angle in degrees (uniform in
    [-rotation, rotation], positive = counter-clockwise), zero fill. Applied in that order
    (crop, flip, rotate), sampled once with bilinear interpolation.
    """

    flip: bool = True
    crop_scale: tuple | None = (0.8, 1.0)
    rotation: float = 10.0
    ratio: tuple = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.crop_scale is not None:
            lo, hi = _pair(self.crop_scale, "crop_scale")
            if not 0 < lo <= hi <= 1:
                raise DataError(f"Expected crop_scale as (min, max) area fractions with "
                                f"0 < min <= max <= 1, or None; received {self.crop_scale!r}.")
            object.__setattr__(self, "crop_scale", (lo, hi))
        lo, hi = _pair(self.ratio, "ratio")
        if not 0 < lo <= hi:
            raise DataError(f"Expected ratio as (min, max) aspect ratios with 0 < min <= max; "
                            f"received {self.ratio!r}.")
        object.__setattr__(self, "ratio", (lo, hi))
        rot = float(self.rotation)
        if not (math.isfinite(rot) and 0 <= rot <= 180):
            raise DataError(f"Expected rotation as a maximum angle in degrees in [0, 180]; "
                            f"received {self.rotation!r}. Use 0 for no rotation.")
        object.__setattr__(self, "rotation", rot)
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def is_identity(self) -> bool:
        return not self.flip and self.crop_scale is None and self.rotation == 0

    def sample(self, rng: np.random.Generator, n: int, image_hw: tuple) -> np.ndarray:
        """Parameters of n images, shape (n, 6): flip, crop left, top, width, height (input
        pixels), angle (radians). Always makes the same draws from rng, in the same order."""
        h, w = (float(d) for d in image_hw)
        u_flip = rng.random(n)
        u_scale = rng.random((n, _ATTEMPTS))
        u_ratio = rng.random((n, _ATTEMPTS))
        u_x, u_y = rng.random(n), rng.random(n)
        u_angle = rng.random(n)

        p = np.zeros((n, 6))
        p[:, 0] = (u_flip < 0.5) if self.flip else 0.0
        p[:, 3], p[:, 4] = w, h
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = h * w * (lo + (hi - lo) * u_scale)
            lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
            r = np.exp(lr0 + (lr1 - lr0) * u_ratio)
            cw, ch = np.sqrt(area * r), np.sqrt(area / r)
            fits = (cw <= w) & (ch <= h)
            rows, first = np.arange(n), np.argmax(fits, axis=1)
            ok = fits[rows, first]
            # fallback, as torchvision: the whole image, or its centre clamped to the ratio range
            fw, fh = w, h
            if w / h < self.ratio[0]:
                fh = w / self.ratio[0]
            elif w / h > self.ratio[1]:
                fw = h * self.ratio[1]
            cw = np.where(ok, cw[rows, first], fw)
            ch = np.where(ok, ch[rows, first], fh)
            ux = np.where(ok, u_x, 0.5)
            uy = np.where(ok, u_y, 0.5)
            p[:, 1], p[:, 2], p[:, 3], p[:, 4] = ux * (w - cw), uy * (h - ch), cw, ch
        p[:, 5] = np.deg2rad((2.0 * u_angle - 1.0) * self.rotation)
        return p

    def apply(self, images: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Augmented copy of float images (B, H, W, C) with parameters from `sample`."""
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.floating):
            images = images.astype(np.float32)
        if self.crop_scale is None and self.rotation == 0:  # flip only: exact mirrors
            out = images.copy()
            flipped = params[:, 0] > 0.5
            out[flipped] = images[flipped, :, ::-1]
            return out
        out = np.empty_like(images)
        step = max(1, _CHUNK_PIXELS // (images.shape[1] * images.shape[2]))
        for i in range(0, len(images), step):   # small chunks stay in cache: ~2x faster
            out[i:i + step] = _warp(images[i:i + step], params[i:i + step])
        return out

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = np.asarray(images)
        return self.apply(images, self.sample(rng, len(images), images.shape[1:3]))


def _pair(v, what) -> tuple:
    try:
        lo, hi = (float(t) for t in v)
    except (TypeError, ValueError):
        raise DataError(f"Expected {what} as a (min, max) pair of numbers; received {v!r}.") from None
    return lo, hi


def _warp(images: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Crop -> flip -> rotate of every image as one inverse affine map, bilinear, zero fill."""
    b, h, w, c = images.shape
    dt = images.dtype
    X = (np.arange(w) + 0.5 - w / 2)[None, None, :]       # output pixel centres, centred
    Y = (np.arange(h) + 0.5 - h / 2)[None, :, None]
    flip, x0, y0, cw, ch, ang = (p[:, k][:, None, None] for k in range(6))
    cos, sin = np.cos(ang), np.sin(ang)
    sx = np.where(flip > 0.5, -cw / w, cw / w)             # undo rotation, flip, crop scaling
    sy = ch / h
    xs = (X * cos - Y * sin) * sx + (x0 + cw / 2 - 0.5)   # sample positions, input pixel indices
    ys = (X * sin + Y * cos) * sy + (y0 + ch / 2 - 0.5)
    # zero fill outside the rotated crop (its extent is [x0, x0 + cw] in input pixels)
    inside = (xs >= x0 - 0.5 - 1e-9) & (xs <= x0 + cw - 0.5 + 1e-9)
    inside &= (ys >= y0 - 0.5 - 1e-9) & (ys <= y0 + ch - 0.5 + 1e-9)
    np.clip(xs, 0, w - 1, out=xs)
    np.clip(ys, 0, h - 1, out=ys)
    xi, yi = np.floor(xs), np.floor(ys)
    wx = (xs - xi).astype(dt)[..., None]
    wy = (ys - yi).astype(dt)[..., None]
    xi, yi = xi.astype(np.intp), yi.astype(np.intp)
    dx = (xi < w - 1).astype(np.intp)                     # neighbour offsets, 0 at the border
    dy = (yi < h - 1) * w
    i00 = yi * w + xi
    i00 += (np.arange(b) * (h * w))[:, None, None]
    flat = images.reshape(b * h * w, c)
    g00, g01 = np.take(flat, i00, axis=0), np.take(flat, i00 + dx, axis=0)
    i00 += dy
    g10, g11 = np.take(flat, i00, axis=0), np.take(flat, i00 + dx, axis=0)
    g01 -= g00
    g01 *= wx
    g00 += g01                                            # top row
    g11 -= g10
    g11 *= wx
    g10 += g11                                            # bottom row
    g10 -= g00
    g10 *= wy
    g00 += g10
    g00 *= inside[..., None]
    return g00


# ----------------------------------------------------------------------------- sources

class _ArraySource:
    """In-memory inputs: one array, or a dict of named arrays (tlbridge/inputs.py)."""

    def __init__(self, x):
        self.x = x

    def load(self, idx, dtype):
        return inputs.cast(inputs.trim(inputs.rows(self.x, idx)), dtype), None, []

    def finish(self, x, dtype):
        return inputs.cast(x, dtype)


class _TextSource(_ArraySource):
    """Tokenized texts, padded per batch to the batch's longest text."""

    def __init__(self, ids: list, pad_id: int):
        self.ids, self.pad_id = ids, pad_id
        self._whole = None

    @property
    def x(self):
        """Every text at once, padded to the longest (the feature cache, row hashes)."""
        if self._whole is None:
            self._whole = text.pad(self.ids, self.pad_id)
        return self._whole

    def load(self, idx, dtype):
        return text.pad([self.ids[i] for i in idx], self.pad_id), None, []

    def finish(self, x, dtype):
        return x


class _FolderSource:
    def __init__(self, files, image_hw, preprocess, on_error):
        self.files, self.hw, self.preprocess, self.on_error = files, image_hw, preprocess, on_error

    def load(self, idx, dtype):
        h, w = self.hw
        out = np.empty((len(idx), h, w, 3), np.uint8)
        keep = np.ones(len(idx), bool)
        failed = []
        for k, i in enumerate(idx):
            try:
                out[k] = _decode(self.files[i], self.hw)
            except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                if self.on_error == "raise":
                    raise _unreadable(self.files[i], exc) from exc
                keep[k] = False
                failed.append(self.files[i])
        return (out if keep.all() else out[keep]), (None if keep.all() else keep), failed

    def finish(self, x, dtype):
        if self.preprocess is None:
            return x.astype(dtype) / np.asarray(255, dtype)
        y = np.asarray(self.preprocess(x))
        if y.shape != x.shape or not np.issubdtype(y.dtype, np.number):
            raise DataError(f"Expected preprocess to return numeric images of shape {x.shape}; "
                            f"received {y.dtype} {y.shape}. It gets a uint8 (or, augmented, "
                            f"float in [0, 255]) batch (B, H, W, 3) and must keep its shape.")
        return y.astype(dtype, copy=False)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BackendNotInstalledError(
            "tl.data.image_folder needs Pillow to decode images; received an environment "
            'without it. Install it with `pip install pillow` (the "tlbridge[torch]" and '
            '"tlbridge[keras]" extras include it).') from None
    return Image


def _decode(path, hw) -> np.ndarray:
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _unreadable(path, exc) -> DataError:
    return DataError(f"Expected a readable image at {path}; received a file Pillow cannot "
                     f"decode ({type(exc).__name__}: {exc}). Remove or fix it, or pass "
                     f"on_error='skip' to leave unreadable files out.")


def _check_header(path):
    """Reads only the header; returns None if fine, else the exception."""
    try:
        with _pil().open(path) as im:
            im.size  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


# ----------------------------------------------------------------------------- dataset

class Dataset:
    """Batches of (x, y float (B, K)) in a seeded order, x float NHWC images or a dict of named
    inputs (token ids and masks stay int64); see `arrays`, `image_folder`.

    len(ds) is the number of batches per epoch; iterate an epoch with ``ds.epoch(e)``.
    """

    def __init__(self, source, labels, image_shape, *, batch_size, shuffle, seed, augment,
                 drop_last, dtype, prefetch, workers, classes=None, files=None, skipped=()):
        self._source = source
        self.labels = labels
        if isinstance(image_shape, dict):       # several named inputs: no image to augment
            self.input_shapes = {k: tuple(v) for k, v in image_shape.items()}
            self.image_shape = None
        else:
            self.image_shape = tuple(int(d) for d in image_shape)
            self.input_shapes = {"x": self.image_shape}
        self.num_samples, self.num_outputs = labels.shape
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.shuffle = bool(shuffle)
        self.seed = _seed(seed)
        if augment is True:
            augment = Augment()
        if augment is not None and not isinstance(augment, Augment):
            raise DataError(f"Expected augment as a tl.data.Augment (or None / True); received "
                            f"{type(augment).__name__}.")
        self.augment = None if augment is None or augment.is_identity else augment
        if self.augment is not None and self.image_shape is None:
            raise DataError(f"Expected augment=None for inputs other than one image array; "
                            f"received augment={self.augment!r} with inputs "
                            f"{sorted(self.input_shapes)}. Augment the images before batching.")
        self.drop_last = bool(drop_last)
        self.dtype = dtype
        self.prefetch = _nonneg_int(prefetch, "prefetch")
        self.workers = _nonneg_int(workers, "workers")
        self.classes = classes
        self.files = files
        self.skipped = list(skipped)
        self._lock = threading.Lock()
        if len(self) == 0:
            raise DataError(f"Expected at least one batch per epoch; received {self.num_samples} "
                            f"sample(s) with batch_size={self.batch_size} and drop_last=True. "
                            f"Lower batch_size or set drop_last=False.")

    @property
    def dtype(self) -> str:
        return self._dtype

    @dtype.setter
    def dtype(self, value):
        if not isinstance(value, str):
            try:
                value = str(np.dtype(value))
            except TypeError:
                pass
        if value not in _DTYPES:
            raise DataError(f"Expected dtype 'float32' or 'float64'; received {value!r}.")
        self._dtype = value

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        raise ArgumentTypeError("Expected an iterable of batches; received a tl.data.Dataset, "
                                "which is iterated one epoch at a time: write "
                                "`for x, y in ds.epoch(e)` (e = 0, 1, ...).")

    def __repr__(self) -> str:
        return (f"Dataset(num_samples={self.num_samples}, num_outputs={self.num_outputs}, "
                f"{'image_shape=' + str(self.image_shape) if self.image_shape else 'inputs=' + str(self.input_shapes)}, "
                f"batch_size={self.batch_size}, "
                f"batches={len(self)}, shuffle={self.shuffle}, seed={self.seed}, "
                f"augment={self.augment!r}, dtype={self.dtype!r})")

    def in_memory_inputs(self):
        """The inputs of a dataset over arrays (tl.data.arrays), else None (files on disk)."""
        return self._source.x if isinstance(self._source, _ArraySource) else None

    def batch_sizes(self) -> list[int]:
        """The size of every batch of an epoch, in order (the last one may be short)."""
        n, b = self.num_samples, self.batch_size
        return [min(b, n - k * b) for k in range(len(self))]

    def plan(self, epoch: int):
        """(order, params): sample indices in epoch order and augmentation parameters per position."""
        epoch = _nonneg_int(epoch, "epoch")
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_samples
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        params = None
        if self.augment is not None:
            params = self.augment.sample(rng, n, self.image_shape[:2])
        return order, params

    def epoch(self, epoch: int, *, start_batch: int = 0):
        """Iterator over the batches of `epoch`, from batch `start_batch` (earlier ones are not
        decoded). Close it (or drop it) to stop early; its threads end with it."""
        order, params = self.plan(epoch)
        start = _nonneg_int(start_batch, "start_batch")
        if start > len(self):
            raise DataError(f"Expected start_batch in [0, {len(self)}] (batches per epoch); "
                            f"received {start_batch}.")
        b = self.batch_size
        jobs = []
        for k in range(start, len(self)):
            sl = slice(k * b, min((k + 1) * b, self.num_samples))
            jobs.append((order[sl], None if params is None else params[sl]))
        return self._run(jobs)

    def as_arrays(self):
        """The whole set, un-augmented and in its stored order, as (x, y). This holds every
        decoded image at once; `indexed_batches` walks the set one batch at a time."""
        if isinstance(self._source, _TextSource):    # one width for all: the longest text
            return self._source.x, self.labels.astype(self.dtype)
        batches = [(x, y) for _, x, y in self.indexed_batches()]
        if not batches:
            raise DataError(f"Expected at least one readable image; received none of "
                            f"{self.num_samples} (see ds.skipped).")
        xs, ys = zip(*batches)
        return inputs.concat(list(xs)), np.concatenate(ys)

    def indexed_batches(self):
        """(indices, x, y) per batch of the whole set, un-augmented, in its stored order:
        `indices` are the sample indices of the rows of x (images that failed to decode under
        on_error="skip" are left out, so it can be shorter than the batch)."""
        n, b = self.num_samples, self.batch_size
        jobs = [(np.arange(s, min(s + b, n)), None) for s in range(0, n, b)]
        return self._run(jobs, augment=False, with_index=True)

    # -- internals
    def _batch(self, idx, params, augment=True):
        x, keep, failed = self._source.load(idx, self.dtype)
        y = self.labels[idx]
        if keep is not None:
            idx, y = idx[keep], y[keep]
            params = None if params is None else params[keep]
        if not inputs.length(x):  # every image of the batch failed to decode (on_error="skip")
            return idx, x, y, failed
        if augment and params is not None:
            x = self.augment.apply(x.astype(self.dtype, copy=False), params)
        return idx, self._source.finish(x, self.dtype), y.astype(self.dtype), failed

    def _run(self, jobs, augment=True, with_index=False):
        """Yields the jobs' batches in order; up to `prefetch` of them computed ahead in threads."""
        def note(failed):
            new = []
            with self._lock:
                for f in failed:
                    if f not in self.skipped:
                        self.skipped.append(f)
                        new.append(f)
            if new:
                warnings.warn(f"tl.data skipped {len(new)} image(s) that could not be decoded: "
                              f"{new[:5]}{' ...' if len(new) > 5 else ''}", stacklevel=3)

        if self.workers == 0 or self.prefetch == 0:
            for idx, params in jobs:
                kept, x, y, failed = self._batch(idx, params, augment)
                note(failed)
                if inputs.length(x):
                    yield (kept, x, y) if with_index else (x, y)
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tlbridge-data")
        pending = deque()
        try:
            it = iter(jobs)
            for idx, params in islice(it, self.prefetch):
                pending.append(pool.submit(self._batch, idx, params, augment))
            while pending:
                fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self._batch, nxt[0], nxt[1], augment))
                kept, x, y, failed = fut.result()
                note(failed)
                if inputs.length(x):
                    yield (kept, x, y) if with_index else (x, y)
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _positive_int(v, what) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise DataError(f"Expected {what} as a positive int; received {v!r}.")
    return int(v)


def _nonneg_int(v, what) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise DataError(f"Expected {what} as an int >= 0; received {v!r}.")
    return int(v)


def _seed(v) -> int:
    return _nonneg_int(v, "seed")


# ----------------------------------------------------------------------------- constructors

def arrays(x, y, *, batch_size=32, shuffle=True, seed=0, augment=None, drop_last=False,
           dtype="float32", prefetch=2, workers=2) -> Dataset:
    """A Dataset over in-memory inputs and labels y (N,) or (N, K): {0, 1} for BCE, class
    indices or one-hot rows for CE, real values for MSE (checked against the model's loss by
    fine_tune and evaluate). x: NHWC float images (N, H, W, C), or a dict of named inputs of a
    model with several ({"input_ids": (N, L) ints, "attention_mask": (N, L) 0/1}). x is not
    copied; float batches are cast to `dtype`, integer ones stay int64. Augmentation (images
    only) zero-fills in the space x is in (after any normalisation)."""
    if isinstance(x, dict):
        x, shape = _named_inputs(x)
    else:
        x = _image_array(x)
        shape = x.shape[1:]
    y = _labels(y, inputs.length(x))
    return Dataset(_ArraySource(x), y.astype(np.float64), shape, batch_size=batch_size,
                   shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last, dtype=dtype,
                   prefetch=prefetch, workers=workers)


def texts(texts, labels, *, model, max_length=None, batch_size=32, shuffle=True, seed=0,
          drop_last=False, dtype="float32", prefetch=2, workers=0) -> Dataset:
    """A Dataset over texts, tokenized once with the model's own tokenizer (tl.tokenize) and
    padded per batch to the batch's longest text; labels as for tl.data.arrays. Seeded
    shuffling as tl.data.arrays; `model` is the text model the batches are for."""
    ids, pad_id = text.encode(model, texts, max_length)
    y = _labels(labels, len(ids))
    shapes = {"input_ids": (None,), "attention_mask": (None,)}
    return Dataset(_TextSource(ids, pad_id), y.astype(np.float64), shapes, batch_size=batch_size,
                   shuffle=shuffle, seed=seed, augment=None, drop_last=drop_last, dtype=dtype,
                   prefetch=prefetch, workers=workers)


def _image_array(x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != 4:
        raise ShapeError(f"Expected x as NHWC images of shape (N, H, W, C); received an array of "
                         f"shape {x.shape} ({x.ndim}-D). Stack single images with np.stack.")
    if x.shape[0] == 0 or min(x.shape[1:]) < 1:
        raise ShapeError(f"Expected x with at least one non-empty image; received shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"Expected x as float images already normalised for the backbone; "
                        f"received dtype {x.dtype}. Use tl.preprocess(model, images) for uint8 "
                        f"images.")
    _check_finite(x, "x")
    return x


def _check_finite(x, what) -> None:
    step = max(1, (1 << 22) // max(1, x[0].size))  # blocks of ~4M values: no full-size temporary
    bad = sum(int(x[i:i + step].size - np.count_nonzero(np.isfinite(x[i:i + step])))
              for i in range(0, len(x), step))
    if bad:
        raise DataError(f"Expected finite values in {what}; received {bad} NaN/inf value(s). "
                        f"Clean or drop those images first.")


def _named_inputs(x: dict):
    """A dict of named input arrays, one row per sample in each: (x, {name: sample shape})."""
    if not x or not all(isinstance(k, str) for k in x):
        raise DataError(f"Expected x as a dict {{input name: array}}, e.g. {{'input_ids': ..., "
                        f"'attention_mask': ...}}; received keys {list(x)}.")
    out = {k: np.asarray(v) for k, v in x.items()}
    counts = {k: (len(v) if v.ndim else 0) for k, v in out.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise ShapeError(f"Expected every input of x with the same number of samples (>= 1); "
                         f"received {counts}.")
    for k, v in out.items():
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
            raise DataError(f"Expected numeric x[{k!r}]; received dtype {v.dtype}.")
        if np.issubdtype(v.dtype, np.floating):
            _check_finite(v, f"x[{k!r}]")
    return out, {k: v.shape[1:] for k, v in out.items()}


def _labels(y, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] < 1:
        raise ShapeError(f"Expected labels y of shape (N,) or (N, K); received {y.shape}.")
    if y.shape[0] != n:
        raise ShapeError(f"Expected one label row per sample; received {n} sample(s) in x "
                         f"but {y.shape[0]} label row(s) in y. Pass x and y of the same length.")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"Expected numeric labels; received dtype {y.dtype}.")
    if np.isinf(y.astype(np.float64)).any():     # NaN marks a missing label (multi-task heads)
        raise DataError(f"Expected finite labels (NaN for a missing one); received "
                        f"{int(np.sum(np.isinf(y.astype(np.float64))))} inf value(s).")
    return y


def image_folder(root, image_size, *, classes=None, on_error="raise", batch_size=32,
                 shuffle=True, seed=0, augment=None, preprocess=None, drop_last=False,
                 dtype="float32", prefetch=2, workers=2, labels="auto") -> Dataset:
    """A Dataset over root/<class>/**/<image> (torchvision's ImageFolder layout).

    Classes are the sorted sub-folder names (hidden ones left out) unless `classes` lists them.
    Images are decoded per batch: RGB, resized to image_size (h, w) bilinear, then augmented
    (in [0, 255] float) and scaled to [0, 1], or passed to `preprocess(batch)` instead (it gets
    uint8, or float in [0, 255] when augmented, shape (B, h, w, 3); it runs in worker threads).
    Augmentation acts on the resized image (not on the full-size file, as torchvision's
    RandomResizedCrop would). Labels: "auto": 2 classes -> (N, 1), class index 1 positive
    (BCE); K > 2 -> one-hot (N, K) (BCE one-vs-rest, or CE); "index": class indices (N, 1)
    for a CE head with K outputs (the one-hot rows are made when training).
    on_error: "raise" (DataError naming the file) or "skip" (left out, listed in ds.skipped,
    with a warning). Headers are checked here; a file whose pixels fail later is dropped from
    its batch under "skip".
    """
    hw = _folder_options(on_error, labels, image_size, preprocess)
    _pil()  # fail now, with the install hint, rather than per file
    root = os.fspath(root)
    classes = _folder_classes(root, classes)
    files, idx = _folder_files(root, classes)
    workers = _nonneg_int(workers, "workers")
    files, idx, skipped = _readable_files(files, idx, classes, on_error, workers)
    idx = np.asarray(idx)
    if labels == "index":
        y = idx[:, None].astype(np.float64)
    else:
        y = (idx == 1)[:, None].astype(np.float64) if len(classes) == 2 else np.eye(len(classes))[idx]
    return Dataset(_FolderSource(files, hw, preprocess, on_error), y, (*hw, 3),
                   batch_size=batch_size, shuffle=shuffle, seed=seed, augment=augment,
                   drop_last=drop_last, dtype=dtype, prefetch=prefetch, workers=workers,
                   classes=list(classes), files=files, skipped=skipped)


def _folder_options(on_error, labels, image_size, preprocess) -> tuple:
    """image_folder's options checked before any file is touched; returns (h, w)."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"Expected on_error 'raise' or 'skip'; received {on_error!r}.")
    if labels not in ("auto", "index"):
        raise DataError(f"Expected labels 'auto' or 'index'; received {labels!r}.")
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        hw = tuple(int(d) for d in image_size)
    except (TypeError, ValueError):
        hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ShapeError(f"Expected image_size as (height, width) positive ints; received "
                         f"{image_size!r}.")
    if preprocess is not None and not callable(preprocess):
        raise DataError(f"Expected preprocess as a callable on uint8 batches (or None); "
                        f"received {type(preprocess).__name__}.")
    return hw


def _folder_classes(root: str, classes) -> list:
    """The class names: root's sorted visible sub-folders, or `classes` checked against them
    (at least 2, distinct, each a folder), so a typo fails here, not as a missing label."""
    if not os.path.isdir(root):
        raise DataError(f"Expected root as a folder with one sub-folder per class; received "
                        f"{root!r}, which {'is not a folder' if os.path.exists(root) else 'does not exist'}.")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            loose = [f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS)]
            hint = (f" It holds {len(loose)} image(s) directly; move them into root/<class>/."
                    if loose else "")
            raise DataError(f"Expected at least 2 class sub-folders in {root} (root/<class>/<image>);"
                            f" received {len(classes)}: {classes}.{hint}")
    else:
        classes = [str(c) for c in classes]
        missing = [c for c in classes if not os.path.isdir(os.path.join(root, c))]
        if len(set(classes)) != len(classes) or len(classes) < 2 or missing:
            raise DataError(f"Expected classes as at least 2 distinct sub-folder names of {root}; "
                            f"received {classes}" + (f" ({missing} not found; found {found})."
                                                     if missing else "."))
    return classes


def _folder_files(root: str, classes: list) -> tuple[list, list]:
    """Every image file under each class folder (sorted walk, links followed) and its class
    index; a class folder without images is an error, not a silently missing class."""
    files, idx = [], []
    for k, c in enumerate(classes):
        n0 = len(files)
        for d, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            files += [os.path.join(d, f) for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
        if len(files) == n0:
            raise DataError(f"Expected images ({', '.join(IMG_EXTENSIONS)}) in class folder "
                            f"{os.path.join(root, c)}; received none. Add images or remove the folder.")
        idx += [k] * (len(files) - n0)
    return files, idx


def _readable_files(files, idx, classes, on_error, workers) -> tuple[list, list, list]:
    """Files whose headers Pillow reads (in `workers` threads): an unreadable one raises, or
    under on_error="skip" is left out with a warning; returns (files, idx, skipped)."""
    if workers:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(_check_header, files))
    else:
        errors = [_check_header(f) for f in files]
    skipped = []
    for f, exc in zip(files, errors):
        if exc is not None:
            if on_error == "raise":
                raise _unreadable(f, exc) from exc
            skipped.append(f)
    if skipped:     # stacklevel 3: image_folder's caller
        warnings.warn(f"tl.data.image_folder skipped {len(skipped)} unreadable file(s): "
                      f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}", stacklevel=3)
        keep = [e is None for e in errors]
        files = [f for f, ok in zip(files, keep) if ok]
        idx = [i for i, ok in zip(idx, keep) if ok]
        present = set(idx)
        empty = [c for k, c in enumerate(classes) if k not in present]
        if empty:
            raise DataError(f"Expected readable images in every class folder; received none in "
                            f"{empty} after skipping {len(skipped)} unreadable file(s).")
    return files, idx, skipped


# ----------------------------------------------------------------------------- few-shot episodes

@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task: indices into the episodes' x, labels remapped to 0..n_way-1
    (`classes[j]` is the original class of label j)."""

    support: np.ndarray
    support_y: np.ndarray
    query: np.ndarray
    query_y: np.ndarray
    classes: tuple

    @property
    def n_way(self) -> int:
        return len(self.classes)


class Episodes:
    """A fixed, seeded list of episodes over one array of images (indices, not copies)."""

    def __init__(self, x, episodes: list, n_way: int, n_shot: int, n_query: int, seed: int):
        self.x = x
        self.episodes = episodes
        self.n_way, self.n_shot, self.n_query, self.seed = n_way, n_shot, n_query, seed

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self):
        return iter(self.episodes)

    def __getitem__(self, i) -> Episode:
        return self.episodes[i]

    def arrays(self, i: int):
        """(support_x, support_y, query_x, query_y) of episode i."""
        e = self.episodes[i]
        return (inputs.rows(self.x, e.support), e.support_y, inputs.rows(self.x, e.query),
                e.query_y)

    def __repr__(self) -> str:
        return (f"Episodes({len(self)} x {self.n_way}-way {self.n_shot}-shot, "
                f"{self.n_query} queries per class, seed={self.seed})")


def episodes(data, n_way: int, n_shot: int, n_query: int, n_episodes: int = 100,
             seed: int = 0) -> Episodes:
    """Seeded few-shot episodes (Vinyals et al. 2016): each draws n_way classes, then n_shot
    support and n_query query images per class, without overlap. `data` is (x, y) with class
    indices or one-hot rows, or a tl.data dataset (read whole with as_arrays). Episode e
    draws from np.random.default_rng([seed, e]): the same episodes on any machine."""
    if isinstance(data, Dataset):
        x, y = data.as_arrays()
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x = _named_inputs(data[0])[0] if isinstance(data[0], dict) else np.asarray(data[0])
        y = np.asarray(data[1])
    else:
        raise DataError(f"Expected data as (x, y) or a tl.data dataset; received "
                        f"{type(data).__name__}.")
    for name, v, low in (("n_way", n_way, 2), ("n_shot", n_shot, 1), ("n_query", n_query, 1),
                         ("n_episodes", n_episodes, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise DataError(f"Expected {name} as an int >= {low}; received {v!r}.")
    seed = _seed(seed)
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    y = y.reshape(-1)
    if len(y) != inputs.length(x):
        raise ShapeError(f"Expected one label per sample; received {inputs.length(x)} samples "
                         f"and {len(y)} labels.")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < n_way:
        raise DataError(f"Expected at least n_way={n_way} classes; received {len(classes)} "
                        f"({classes.tolist()}).")
    need = n_shot + n_query
    small = [(c.item(), int(k)) for c, k in zip(classes, counts) if k < need]
    if small:
        raise DataError(f"Expected every class to have n_shot + n_query = {need} images; "
                        f"received fewer for (class, count) {small[:5]}. Lower n_shot or "
                        f"n_query, or drop those classes.")
    by_class = {c.item(): np.nonzero(y == c)[0] for c in classes}
    out = []
    for e in range(int(n_episodes)):
        rng = np.random.default_rng([seed, e])
        chosen = rng.choice(len(classes), size=n_way, replace=False)
        s, sy, q, qy = [], [], [], []
        for j, ci in enumerate(chosen):
            idx = rng.choice(by_class[classes[ci].item()], size=need, replace=False)
            s.append(idx[:n_shot])
            q.append(idx[n_shot:])
            sy += [j] * n_shot
            qy += [j] * n_query
        out.append(Episode(np.concatenate(s), np.asarray(sy), np.concatenate(q), np.asarray(qy),
                           tuple(classes[chosen].tolist())))
    return Episodes(x, out, n_way, n_shot, n_query, seed)

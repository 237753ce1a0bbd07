"""The losses of a step, written with keras.ops so every engine shares them (tlbridge/losses.py's
formulas; y: (N, K) float labels, NaN for a missing label in multi-task batches)."""
from __future__ import annotations

import numpy as np
from keras import ops

from . import engine
from .network import mean


def bce(y, z):
    """Binary cross-entropy from logits, per entry. Keras' own on TensorFlow; elsewhere written
    out as TensorFlow's sigmoid_cross_entropy_with_logits is (max(z, 0) - z y +
    log1p(exp(-|z|))), because Keras 3.15.1 computes a float64 one in float32 there
    (keras-team/keras#23223)."""
    if engine.TENSORFLOW:
        return ops.binary_crossentropy(y, z, from_logits=True)
    return ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z)))


def _masked(per, present, count=None):
    """(mean of `per` over the present labels, 0 when there are none; 1 if any, else 0).
    count: the present labels of the global batch when this is one replica's share of it."""
    count = ops.sum(present) if count is None else count
    return ops.sum(per * present) / ops.maximum(count, 1.0), ops.cast(count > 0, per.dtype)


def _present(yt, loss):
    """Which labels count: whole rows for CE (a row is missing when any entry is NaN),
    entries otherwise."""
    missing = ops.isnan(yt)
    if loss.name == "ce":
        return ops.logical_not(ops.any(missing, axis=1))
    return ops.logical_not(missing)


def task_counts(y, ml):
    """Present labels per task in a (global) batch: the denominators of the task means."""
    return ops.stack([ops.sum(ops.cast(_present(y[:, a:b], ml.task_loss(t)), y.dtype))
                      for t, (a, b) in enumerate(ml.slices().values())])


def multi_loss(z, y, ml, log_vars, counts=None, first=None):
    """tlbridge/multitask.py: (total, per-task losses (T,), NaN for a task without labels in
    the batch: for reporting only); NaN labels are missing. Data-parallel: counts are the
    global batch's (task_counts), and `first` (1.0 on the first replica, else 0.0) adds the
    log-variance terms once."""
    parts, has = [], []
    for t, (a, b) in enumerate(ml.slices().values()):
        zt, yt, loss = z[:, a:b], y[:, a:b], ml.task_loss(t)
        count = None if counts is None else counts[t]
        missing = ops.isnan(yt)
        target = ops.where(missing, ops.zeros_like(yt), yt)
        if loss.name == "ce":
            rows = ops.cast(_present(yt, loss), z.dtype)
            eps = loss.label_smoothing
            if eps:
                target = target * (1.0 - eps) + eps / int(zt.shape[-1])
            per = ops.categorical_crossentropy(target, zt, from_logits=True)
            part, h = _masked(per, rows, count)
            parts.append(part)
            has.append(h)
            continue
        present = ops.cast(_present(yt, loss), z.dtype)
        if loss.name == "bce":
            per = bce(target, zt)
        else:
            per = ops.square(zt - target)
        part, h = _masked(per, present, count)
        parts.append(part)
        has.append(h)
    parts, has = ops.stack(parts), ops.stack(has)
    if ml.uncertainty:
        if first is None:
            total = ops.sum(has * (ops.exp(-log_vars) * parts + log_vars))
        else:                           # the log-variance terms are counted once
            total = ops.sum(has * (ops.exp(-log_vars) * parts + first * log_vars))
    else:
        total = ops.sum(parts * ops.convert_to_tensor(np.array(ml.weights), dtype=z.dtype))
    if counts is not None:
        return total, ops.stop_gradient(parts)       # summed over replicas before reporting
    report = ops.where(has > 0, parts, ops.full_like(parts, float("nan")))
    return total, ops.stop_gradient(report)


def loss_fn(z, y, loss, log_vars=None, rows=None, mask=None):
    """tlbridge/losses.py's formulas with Keras' own functions (y: (N, K) float labels).
    rows: the global batch's size when z is one replica's share of it (data-parallel): the
    sum over this share divided by the global count, so the replicas' values add up to the
    mean. mask: 1 for this share's rows, 0 for the padding a JAX replica carries."""
    if loss.name == "multi":
        return multi_loss(z, y, loss, log_vars)[0]
    if rows is not None:
        rows = ops.cast(rows, z.dtype)
        if loss.name == "bce":
            per = mean(bce(y, z), -1)   # mean over K per row (bce is per entry)
        elif loss.name == "ce":
            eps = loss.label_smoothing
            if eps:
                y = y * (1.0 - eps) + eps / int(z.shape[-1])
            per = ops.categorical_crossentropy(y, z, from_logits=True)
        else:
            per = mean(ops.square(z - y), -1)
        if mask is not None:
            per = per * ops.cast(mask, per.dtype)
        return ops.sum(per) / rows
    if loss.name == "bce":
        return mean(bce(y, z), (0, 1))
    if loss.name == "ce":
        eps = loss.label_smoothing
        if eps:
            y = y * (1.0 - eps) + eps / int(z.shape[-1])
        return mean(ops.categorical_crossentropy(y, z, from_logits=True), 0)
    return mean(ops.square(z - y), (0, 1))

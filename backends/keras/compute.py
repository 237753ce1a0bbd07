"""Forward passes, losses and gradients on Keras (TensorFlow). Inputs arrive as validated NHWC
numpy."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras import ops

from tlbridge import inputs

from . import devices


def input_spec(inputs) -> object:
    """tf.function input signature of a model's inputs (one keras.Input, or a dict of them):
    any batch size, and any sequence length where the model takes any, so one trace serves."""
    def one(t):
        return tf.TensorSpec((None, *t.shape[1:]), t.dtype)
    return {k: one(t) for k, t in inputs.items()} if isinstance(inputs, dict) else one(inputs)


def constant(x):
    """numpy model input (an array or a dict of them) as tensors."""
    return {k: tf.constant(v) for k, v in x.items()} if isinstance(x, dict) else tf.constant(x)


def _forward_fn(m, which: str):
    """A cached tf.function of the model in inference mode (eager Keras is several times slower)."""
    key = f"_fwd_{which}"
    if key not in m.state:
        model = m.state["feature_model"] if which == "features" else m.native
        m.state[key] = tf.function(lambda x: model(x, training=False),
                                   input_signature=[input_spec(m.state["inputs"])],
                                   autograph=False)
    return m.state[key]


def _batched(m, which, x, batch_size):
    fn = _forward_fn(m, which)
    with devices.scope(m.state.get("device", "cpu")):
        return np.concatenate([np.asarray(fn(constant(inputs.trim(inputs.rows(x, slice(i, i + batch_size))))))
                               for i in range(0, inputs.length(x), batch_size)], axis=0)


def features(m, x, batch_size):
    return _batched(m, "features", x, batch_size)


def logits(m, x, batch_size):
    return _batched(m, "logits", x, batch_size)


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
            per = ops.binary_crossentropy(target, zt, from_logits=True)
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
        return total, tf.stop_gradient(parts)       # summed over replicas before reporting
    report = ops.where(has > 0, parts, ops.full_like(parts, float("nan")))
    return total, tf.stop_gradient(report)


def loss_fn(z, y, loss, log_vars=None, rows=None):
    """tlbridge/losses.py's formulas with Keras' own functions (y: (N, K) float labels).
    rows: the global batch's size when z is one replica's share of it (data-parallel): the
    sum over this share divided by the global count, so the replicas' values add up to the
    mean."""
    if loss.name == "multi":
        return multi_loss(z, y, loss, log_vars)[0]
    if rows is not None:
        rows = ops.cast(rows, z.dtype)
        if loss.name == "bce":
            per = ops.binary_crossentropy(y, z, from_logits=True)   # mean over K per row
        elif loss.name == "ce":
            eps = loss.label_smoothing
            if eps:
                y = y * (1.0 - eps) + eps / int(z.shape[-1])
            per = ops.categorical_crossentropy(y, z, from_logits=True)
        else:
            per = ops.mean(ops.square(z - y), axis=-1)
        return ops.sum(per) / rows
    if loss.name == "bce":
        return ops.mean(ops.binary_crossentropy(y, z, from_logits=True))
    if loss.name == "ce":
        eps = loss.label_smoothing
        if eps:
            y = y * (1.0 - eps) + eps / int(z.shape[-1])
        return ops.mean(ops.categorical_crossentropy(y, z, from_logits=True))
    return ops.mean(ops.square(z - y))


def loss_and_grads(m, x: np.ndarray, y: np.ndarray, training: bool, loss):
    """The loss from logits, and d loss / d every trainable parameter, returned in the
    canonical (torch) layout."""
    with devices.scope(m.state.get("device", "cpu")):
        return _loss_and_grads(m, x, y, training, loss)


def _loss_and_grads(m, x, y, training, loss):
    slots = [s for s in m.state["slots"] if s.is_param and s.name not in m.frozen]
    xt, yt = constant(x), tf.constant(y)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for s in slots:
            tape.watch(s.variable.value)
        z = m.native(xt, training=training)
        log_vars = m.state.get("log_vars")
        loss = loss_fn(z, yt, loss, None if log_vars is None else log_vars.value)
    grads = tape.gradient(loss, [s.variable.value for s in slots]) if slots else []
    return float(loss), {s.name: np.asarray(s.to_canonical(
        np.zeros(tuple(s.variable.shape), m.dtype) if g is None
        else np.asarray(tf.convert_to_tensor(g))))      # an embedding's IndexedSlices too
        for s, g in zip(slots, grads)}

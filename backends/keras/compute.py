"""Forward passes, losses and gradients on Keras (TensorFlow). Inputs arrive as validated NHWC
numpy."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras import ops

from tlbridge import inputs

from . import devices
from .losses import loss_fn, multi_loss, task_counts  # noqa: F401  (training.py imports them here)


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

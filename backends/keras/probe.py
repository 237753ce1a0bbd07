"""The activations a float32 judge looks at (tlbridge/fp32.py): the input of every nonlinearity,
in forward order, as float64 numpy in Keras' layout (NHWC; the twin of
backends/torch/probe.py)."""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

from . import engine
from .network import TorchGELU

_SMOOTH = {"silu", "swish", "sigmoid", "gelu"}


def _kind(layer) -> str | None:
    if isinstance(layer, layers.ReLU):
        return "relu6" if layer.max_value == 6.0 else "relu"
    if isinstance(layer, layers.MaxPooling2D):
        return "maxpool"
    if isinstance(layer, TorchGELU):
        return "smooth"
    if isinstance(layer, layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        return "relu" if name == "relu" else "smooth" if name in _SMOOTH else None
    return None


def _site(layer):
    """(input tensor, pool): a max-pool's input before the ZeroPadding2D that tlbridge puts in
    front of it (torch pads inside the pool), with torch's (size, stride, padding)."""
    tensor, pool = layer.input, None
    if isinstance(layer, layers.MaxPooling2D):
        source = tensor._keras_history.operation
        pad = 0
        if isinstance(source, layers.ZeroPadding2D):
            tensor, pad = source.input, int(source.padding[0][0])
        pool = (int(layer.pool_size[0]), int(layer.strides[0]), pad)
    return tensor, pool


def _probe(m):
    """A model with every site's input as an output (built once per model)."""
    if "_probe" not in m.state:
        net = m.native
        found = [(kind, *_site(layer)) for layer in net._flatten_layers(include_self=False)
                 if (kind := _kind(layer))]
        model = keras.Model(m.state["inputs"], [t for _, t, _ in found] + list(net.outputs))
        fns = _compiled(model, m.state["inputs"])
        m.state["_probe"] = (fns, [(kind, pool) for kind, _, pool in found])
    return m.state["_probe"]


def _compiled(model, inputs) -> dict:
    """The probe model per mode: a tf.function on TensorFlow, traced once per mode (eager Keras
    is several times slower); a plain call on JAX (a train-mode pass writes BatchNorm's
    statistics, which a jitted call would not)."""
    if not engine.TENSORFLOW:
        return {mode: (lambda x, mode=mode: model(x, training=mode)) for mode in (False, True)}
    import tensorflow as tf
    from .compute import constant, input_spec
    return {mode: (lambda x, f=tf.function(lambda x, mode=mode: model(x, training=mode),
                                           autograph=False, input_signature=[input_spec(inputs)]):
                   f(constant(x)))
            for mode in (False, True)}


def activations(m, x, training: bool) -> tuple[list, np.ndarray]:
    """([(kind, input, pool)], logits) of one forward pass. BatchNorm in train mode updates
    its statistics."""
    fns, kinds = _probe(m)
    outs = fns[bool(training)](x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]     # no nonlinearity: logits only
    arrays = [np.asarray(o, np.float64) for o in outs]
    return [(kind, a, pool) for (kind, pool), a in zip(kinds, arrays[:-1])], arrays[-1]

"""LoRA adapters on Keras: the twin of backends/torch/lora.py.

The adapter is its own layer beside the base Dense / Conv2D in the functional graph: it takes
the base layer's input x (for a conv, after any explicit zero padding; the base's padding
mode otherwise) and output y, and returns
y + B(A(dropout(x))) * alpha / r, as peft does. Its variables are in the model's dtype (Keras'
built-in enable_lora keeps float32 ones in a float64 layer, which would break fp64 parity).
Canonical layouts: A (r, in) / (r, cin, kh, kw), B (out, r) / (out, r, 1, 1), translated at the
boundary by weights.py ("lora_dense", "lora_conv").
"""
from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable("tlbridge")
class LoraAdapter(layers.Layer):
    """kind "dense": A kernel (in, r), B kernel (r, out); kind "conv": A (kh, kw, cin, r) with
    the base's strides, B (1, 1, r, cout)."""

    def __init__(self, kind, rank, alpha, dropout, fan_in, units, kernel=(1, 1), strides=(1, 1),
                 padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.kind, self.rank, self.alpha = str(kind), int(rank), float(alpha)
        self.rate, self.fan_in, self.units = float(dropout), int(fan_in), int(units)
        self.kernel, self.strides, self.padding = tuple(kernel), tuple(strides), str(padding)
        self.scaling = self.alpha / self.rank
        self.drop = layers.Dropout(self.rate, dtype=self.dtype_policy) if self.rate > 0 else None

    def build(self, x_shape=None, y_shape=None):
        if self.kind == "conv":
            a, b = (*self.kernel, self.fan_in, self.rank), (1, 1, self.rank, self.units)
        else:
            a, b = (self.fan_in, self.rank), (self.rank, self.units)
        self.lora_A = self.add_weight(shape=a, initializer="zeros", name="lora_A")
        self.lora_B = self.add_weight(shape=b, initializer="zeros", name="lora_B")

    def call(self, x, y, training=None):
        if self.drop is not None:
            x = self.drop(x, training=training)
        if self.kind == "conv":
            h = ops.conv(x, self.lora_A, strides=self.strides, padding=self.padding)
            h = ops.conv(h, self.lora_B, strides=1, padding="valid")
        else:
            h = ops.matmul(ops.matmul(x, self.lora_A), self.lora_B)
        return y + h * self.scaling

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "rank": self.rank, "alpha": self.alpha,
                "dropout": self.rate, "fan_in": self.fan_in, "units": self.units,
                "kernel": self.kernel, "strides": self.strides, "padding": self.padding}


def adapt(mirror, x, y, name: str, base):
    """y (the output of `base` on x) with the adapter of spec.adapters named `name`, if any."""
    settings = mirror.adapters.get(name)
    if settings is None:
        return y
    rank, alpha, dropout = settings
    conv = isinstance(base, layers.Conv2D)
    adapter = LoraAdapter("conv" if conv else "dense", rank, alpha, dropout, int(x.shape[-1]),
                          int(y.shape[-1]), base.kernel_size if conv else (1, 1),
                          base.strides if conv else (1, 1), base.padding if conv else "valid",
                          name=name + ".lora",
                          dtype=mirror.dtype)
    mirror.entries.append((name, "lora_conv" if conv else "lora_dense", adapter))
    return adapter(x, y)


def layers_of(entries) -> dict[str, tuple]:
    """Canonical name -> (kind, in, out, kh, kw, groups) of every backbone Dense / Conv2D /
    DepthwiseConv2D the Mirror built (contract: lora_layers)."""
    out = {}
    for prefix, kind, layer in entries:
        if not prefix.startswith("backbone."):
            continue
        shape = tuple(int(d) for d in layer.kernel.shape) if kind in (
            "dense", "conv", "depthwise") else None
        if kind == "dense":
            out[prefix] = ("linear", shape[0], shape[1], 1, 1, 1)
        elif kind == "conv":
            out[prefix] = ("conv", shape[2], shape[3], shape[0], shape[1], 1)
        elif kind == "depthwise":
            out[prefix] = ("conv", shape[2], shape[2], shape[0], shape[1], shape[2])
    return out

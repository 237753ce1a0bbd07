"""Seeded numpy initialisation, so one seed gives the same weights on both backends.

Follows torchvision's own init for the portable families: conv kernels
kaiming-normal (fan_out, ReLU gain), conv biases 0, BatchNorm weight 1 / bias 0 /
running stats 0 and 1, LayerNorm weight 1 / bias 0, ConvNeXt layer_scale 1e-6;
linear layers torch's default U(±1/√fan_in).
"""
from __future__ import annotations

import numpy as np


def torchvision_style(shapes: dict[str, tuple], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "layer_scale":  # ConvNeXt's per-channel residual scale: torchvision's 1e-6
            out[name] = np.full(shape, 1e-6)
        elif leaf == "running_var":
            out[name] = np.ones(shape)
        elif leaf == "running_mean":
            out[name] = np.zeros(shape)
        elif len(shape) == 4:  # conv OIHW (depthwise: O, 1, kh, kw)
            fan_out = shape[0] * shape[2] * shape[3]
            out[name] = rng.normal(0.0, np.sqrt(2.0 / fan_out), size=shape)
        elif len(shape) == 2 and name.endswith("embeddings.weight"):  # nn.Embedding: N(0, 1)
            out[name] = rng.normal(0.0, 1.0, size=shape)
        elif len(shape) == 2:  # linear (out, in)
            bound = 1.0 / np.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape)
        elif len(shape) == 1:  # biases 0; a 1-D weight is a norm scale (BN/LayerNorm): 1
            out[name] = np.ones(shape) if leaf == "weight" else np.zeros(shape)
        else:
            out[name] = rng.normal(0.0, 0.02, size=shape)
    # BatchNorm / LayerNorm scales start at one: they are the 1-D `weight` next to running stats
    for name in list(out):
        if name.endswith(".running_var"):
            out[name[: -len("running_var")] + "weight"] = np.ones(shapes[name])
    return out


def bert_style(shapes: dict[str, tuple], rng: np.random.Generator, std: float = 0.02) -> dict[str, np.ndarray]:
    """transformers' BertPreTrainedModel init: linear and embedding weights N(0, 0.02), biases
    0, LayerNorm weight 1 / bias 0."""
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            out[name] = rng.normal(0.0, std, size=shape)
        else:
            out[name] = np.ones(shape) if name.endswith("LayerNorm.weight") else np.zeros(shape)
    return out


def linear_head(dims: list[int], rng: np.random.Generator, names: list[str]) -> dict[str, np.ndarray]:
    """torch.nn.Linear's default init for a chain of layers dims[0] -> ... -> dims[-1]."""
    out = {}
    for prefix, fan_in, fan_out in zip(names, dims[:-1], dims[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        out[prefix + ".weight"] = rng.uniform(-bound, bound, size=(fan_out, fan_in))
        out[prefix + ".bias"] = rng.uniform(-bound, bound, size=(fan_out,))
    return out

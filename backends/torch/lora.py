"""LoRA adapters on PyTorch (tlbridge/lora.py decides which layers; this file wraps them).

A wrapper *is* the base layer (a subclass of nn.Linear / nn.Conv2d adopting its parameters), so
the base keeps its canonical name `<module>.weight` and every isinstance check elsewhere still
holds; its children `lora_A` and `lora_B` give `<module>.lora_A.weight` / `.lora_B.weight`, the
names peft writes in its adapter files. Output: base(x) + B(A(dropout(x))) * alpha / r (peft's
order of operations). Its twin is backends/keras/lora.py.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


def _adopt(wrapper: nn.Module, base: nn.Module, rank: int, alpha: float, dropout: float):
    """Give `wrapper` the base's parameters (same tensors) and the adapter's settings."""
    wrapper.weight = base.weight
    wrapper.bias = base.bias
    wrapper.rank, wrapper.alpha = int(rank), float(alpha)
    wrapper.scaling = float(alpha) / int(rank)
    wrapper.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    wrapper.train(base.training)


class LoraLinear(nn.Linear):
    """nn.Linear plus a low-rank update: lora_A (r, in), lora_B (out, r), B = 0 at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        _adopt(self, base, rank, alpha, dropout)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + \
            self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class LoraConv2d(nn.Conv2d):
    """nn.Conv2d (groups=1) plus peft's conv factorisation: lora_A a k x k conv cin -> r with
    the base's stride, padding and dilation; lora_B a 1x1 conv r -> cout."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(base, attr))
        _adopt(self, base, rank, alpha, dropout)
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                base.padding, base.dilation, bias=False,
                                padding_mode=base.padding_mode, **like)
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False, **like)

    def forward(self, x):
        return self._conv_forward(x, self.weight, self.bias) + \
            self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def wrap(module: nn.Module, adapters, prefix: str) -> None:
    """Replace each adapted layer of `module` (canonical names start with `prefix`) in place."""
    for name, rank, alpha, dropout in adapters:
        path = name[len(prefix):].split(".")
        parent = module.get_submodule(".".join(path[:-1]))
        base = getattr(parent, path[-1])
        kind = LoraConv2d if isinstance(base, nn.Conv2d) else LoraLinear
        setattr(parent, path[-1], kind(base, rank, alpha, dropout))


def layers(net: nn.Module) -> dict[str, tuple]:
    """Canonical name -> (kind, in, out, kh, kw, groups) of every Linear and Conv2d of the
    backbone (an adapter's own lora_A / lora_B excluded)."""
    out = {}
    for name, mod in net.backbone.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            continue
        if isinstance(mod, nn.Linear):
            out[f"backbone.{name}"] = ("linear", mod.in_features, mod.out_features, 1, 1, 1)
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            out[f"backbone.{name}"] = ("conv", mod.in_channels, mod.out_channels, kh, kw,
                                       mod.groups)
    return out

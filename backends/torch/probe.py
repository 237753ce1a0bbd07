"""The activations a float32 judge looks at (tlbridge/fp32.py): the input of every nonlinearity,
in forward order, as float64 numpy in torch's own layout (NCHW in convolution nets; ConvNeXt's
GELU sees NHWC, as torchvision permutes there).

Kinks (ReLU, ReLU6, max-pool choices) are where float32 rounding can flip a gradient; smooth
activations (GELU, SiLU, sigmoid) carry the forward error of nets without kinks."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from .compute import to_nchw

_KINDS = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"),
          (nn.GELU, "smooth"), (nn.SiLU, "smooth"), (nn.Sigmoid, "smooth"))


def _kind(module) -> str | None:
    return next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)


def _pool(module) -> tuple:
    """(size, stride, padding) of a square nn.MaxPool2d."""
    def one(v):
        return v if isinstance(v, int) else v[0]
    return one(module.kernel_size), one(module.stride or module.kernel_size), one(module.padding)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def activations(net: nn.Module, x, training: bool) -> tuple[list, np.ndarray]:
    """([(kind, input, pool)], logits) of one forward pass. Pre-hooks, since torchvision's
    ReLUs work in place (a forward hook would see the output); a module called twice (a
    ResNet block's ReLU) is recorded twice. BatchNorm in train mode updates its statistics."""
    sites = []

    def record(module, args):
        kind = _kind(module)
        sites.append((kind, _numpy(args[0]), _pool(module) if kind == "maxpool" else None))

    hooks = [mod.register_forward_pre_hook(record) for mod in net.modules() if _kind(mod)]
    was = net.training
    net.train(training)
    try:
        with torch.no_grad():
            z = net(to_nchw(net, x))
    finally:
        net.train(was)
        for h in hooks:
            h.remove()
    return sites, _numpy(z)


def channels_last(net: nn.Module, on: bool) -> None:
    """Put the convolution weights in channels_last (NHWC) memory or back: torch then runs the
    convolution kernels TensorFlow runs on the CPU (the float32 judge's like-for-like torch)."""
    net.to(memory_format=torch.channels_last if on else torch.contiguous_format)


@contextlib.contextmanager
def decided(net: nn.Module, sites: list):
    """Run net with the kink decisions of another run: `sites` as activations() returned them
    (another backend's or precision's, in torch's layout). Each ReLU keeps the units that run kept, each ReLU6
    saturates where it saturated, each max-pool takes the elements it took; the values are
    net's own. So float64 with float32's decisions is the truth float32 rounding is measured
    against, without the jumps of a flipped kink."""
    kinks = [(kind, a, pool) for kind, a, pool in sites if kind != "smooth"]
    modules = [mod for mod in net.modules() if _kind(mod) not in (None, "smooth")]
    inplace = [(mod, mod.inplace) for mod in modules if hasattr(mod, "inplace")]
    step = iter(range(len(kinks)))

    def replace(module, args, _out):
        kind, a, pool = kinks[next(step)]
        x = args[0]
        ref = torch.from_numpy(a).to(x)
        if kind == "relu":
            return x * (ref > 0)
        if kind == "relu6":
            return torch.where(ref > 6, torch.full_like(x, 6.0), x * (ref > 0))
        size, stride, pad = pool
        _, idx = torch.nn.functional.max_pool2d(ref, size, stride, pad, return_indices=True)
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    for mod, _ in inplace:
        mod.inplace = False            # the hook needs the input as it was
    hooks = [mod.register_forward_hook(replace) for mod in modules]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for mod, flag in inplace:
            mod.inplace = flag

"""Canonical weights on PyTorch: the state_dict itself, minus num_batches_tracked."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict(keep_vars=True).items()
            if not k.endswith("num_batches_tracked")}


def canonical_shapes(net: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in _state(net).items()}


def param_names(net: nn.Module) -> list[str]:
    return [k for k, _ in net.named_parameters()]


def get_weights(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in _state(net).items()}


@torch.no_grad()
def set_weights(net: nn.Module, weights: dict[str, np.ndarray]) -> None:
    state = _state(net)
    for key, value in weights.items():
        target = state[key]
        target.copy_(torch.as_tensor(np.asarray(value), dtype=target.dtype, device=target.device))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy on the CPU (the canonical weights' home: a GPU model's snapshot takes no GPU
    memory), without numpy in between, in the tensor's own memory format: converting a
    channels_last convolution kernel to NCHW is a strided copy (ResNet-18's two an epoch: 47 ms
    of 0.8 s, docs/speed.md)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _state(net).items()}


def snapshot_weights(snap: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A snapshot as canonical numpy arrays (NCHW order, C-contiguous) for a checkpoint."""
    return {k: v.contiguous().numpy() for k, v in snap.items()}


@torch.no_grad()
def restore(net: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for key, target in _state(net).items():
        target.copy_(snap[key])


def apply_freeze(net: nn.Module, frozen: set[str]) -> None:
    for name, param in net.named_parameters():
        param.requires_grad_(name not in frozen)
    net.train(net.training)  # re-apply the frozen-BatchNorm rule

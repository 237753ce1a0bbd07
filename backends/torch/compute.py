"""Forward passes, losses and gradients on PyTorch. Inputs arrive as validated NHWC numpy."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _device(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def to_nchw(net: nn.Module, x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).to(_device(net)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _batched(fn, net: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    was_training = net.training
    net.eval()
    try:
        outs = [fn(to_nchw(net, x[i:i + batch_size])).cpu().numpy()
                for i in range(0, len(x), batch_size)]
    finally:
        net.train(was_training)
    return np.concatenate(outs, axis=0)


def features(net, x, batch_size):
    return _batched(net.backbone, net, x, batch_size)


def logits(net, x, batch_size):
    return _batched(net, net, x, batch_size)


def loss_fn(z: torch.Tensor, y: torch.Tensor, loss) -> torch.Tensor:
    """tlbridge/losses.py's formulas with torch's own functions (y: (N, K) float labels)."""
    if loss.name == "bce":
        return F.binary_cross_entropy_with_logits(z, y)
    if loss.name == "ce":       # probability targets: (1 - eps) * y + eps / K, mean over N
        return F.cross_entropy(z, y, label_smoothing=loss.label_smoothing)
    return F.mse_loss(z, y)


def loss_and_grads(net: nn.Module, x: np.ndarray, y: np.ndarray, training: bool, loss):
    """The loss from logits, and d loss / d every trainable parameter."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    was_training = net.training
    net.train(training)
    try:
        z = net(to_nchw(net, x))
        loss = loss_fn(z, torch.from_numpy(y).to(z.device), loss)
        grads = torch.autograd.grad(loss, [p for _, p in named]) if named else []
    finally:
        net.train(was_training)
    return float(loss.detach()), {n: g.detach().cpu().numpy() for (n, _), g in zip(named, grads)}

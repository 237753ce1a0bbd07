"""Forward passes and BCE gradients on PyTorch. Inputs arrive as validated NHWC numpy."""
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


def loss_and_grads(net: nn.Module, x: np.ndarray, y: np.ndarray, training: bool):
    """Mean BCE over all N*K entries from logits, and d loss / d every trainable parameter."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    was_training = net.training
    net.train(training)
    try:
        z = net(to_nchw(net, x))
        loss = F.binary_cross_entropy_with_logits(z, torch.from_numpy(y).to(z.device))
        grads = torch.autograd.grad(loss, [p for _, p in named]) if named else []
    finally:
        net.train(was_training)
    return float(loss.detach()), {n: g.detach().cpu().numpy() for (n, _), g in zip(named, grads)}

"""Forward passes, losses and gradients on PyTorch. Inputs arrive as validated NHWC numpy."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlbridge import inputs


def _device(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def to_nchw(net: nn.Module, x, channels_last: bool = False):
    """Model input on the model's device: NHWC images become NCHW (channels_last: NCHW in NHWC
    memory, which the NHWC array already is); a dict of named inputs (token ids, masks) goes as
    it is, one tensor per input."""
    if isinstance(x, dict):
        return {k: torch.from_numpy(v).to(_device(net)) for k, v in x.items()}
    t = torch.from_numpy(x).to(_device(net)).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def example(spec) -> object:
    """One zero sample of the model's declared inputs, in its dtype, to size the backbone."""
    from tlbridge import zoo
    from .network import DTYPES
    sig = zoo.signature(spec.backbone, spec.input_shape, spec.options)
    if len(sig) == 1 and sig[0].kind == "image":
        h, w, c = spec.input_shape
        return torch.zeros(1, c, h, w, dtype=DTYPES[spec.dtype])
    return {s.name: torch.ones(1, *(1 if d is None else d for d in s.shape),
                               dtype=DTYPES[spec.dtype] if s.is_float else torch.int64)
            for s in sig}


@torch.no_grad()
def _batched(fn, net: nn.Module, x, batch_size: int) -> np.ndarray:
    was_training = net.training
    net.eval()
    try:
        outs = [fn(to_nchw(net, inputs.trim(inputs.rows(x, slice(i, i + batch_size))))).cpu().numpy()
                for i in range(0, inputs.length(x), batch_size)]
    finally:
        net.train(was_training)
    return np.concatenate(outs, axis=0)


def features(net, x, batch_size):
    return _batched(net.backbone, net, x, batch_size)


def logits(net, x, batch_size):
    return _batched(net, net, x, batch_size)


def _masked(per: torch.Tensor, present: torch.Tensor, count=None):
    """(mean of `per` over the present labels, 0 when there are none; 1 if any, else 0).
    count: the present labels of the global batch when this is one rank's share of it."""
    count = present.sum() if count is None else count
    return (per * present).sum() / count.clamp(min=1), (count > 0).to(per.dtype)


def _present(yt, loss):
    """Which labels count: whole rows for CE (a row is missing when any entry is NaN),
    entries otherwise."""
    missing = torch.isnan(yt)
    return ~missing.any(dim=1) if loss.name == "ce" else ~missing


def task_counts(y, ml) -> torch.Tensor:
    """Present labels per task in a (global) batch: the denominators of the task means."""
    return torch.stack([_present(y[:, a:b], ml.task_loss(t)).sum().to(y.dtype)
                        for t, (a, b) in enumerate(ml.slices().values())])


def multi_loss(z, y, ml, log_vars, counts=None, first=True):
    """tlbridge/multitask.py: (total, per-task losses (T,), NaN for a task without labels in
    the batch: for reporting only); NaN labels are missing. Data-parallel: counts are the
    global batch's (task_counts), and only the first share adds the log-variance terms."""
    parts, has = [], []
    for t, (a, b) in enumerate(ml.slices().values()):
        zt, yt, loss = z[:, a:b], y[:, a:b], ml.task_loss(t)
        count = None if counts is None else counts[t]
        if loss.name == "ce":
            rows = _present(yt, loss)
            target = torch.where(rows[:, None], yt, torch.zeros_like(yt))
            per = F.cross_entropy(zt, target, label_smoothing=loss.label_smoothing,
                                  reduction="none")
            part, h = _masked(per, rows.to(z.dtype), count)
            parts.append(part)
            has.append(h)
            continue
        present = _present(yt, loss)
        target = torch.where(present, yt, torch.zeros_like(yt))
        if loss.name == "bce":
            per = F.binary_cross_entropy_with_logits(zt, target, reduction="none")
        else:
            per = (zt - target) ** 2
        part, h = _masked(per, present.to(z.dtype), count)
        parts.append(part)
        has.append(h)
    parts, has = torch.stack(parts), torch.stack(has)
    if ml.uncertainty:
        if first:
            total = (has * (torch.exp(-log_vars) * parts + log_vars)).sum()
        else:                           # the log-variance terms are counted once, on rank 0
            total = (has * (torch.exp(-log_vars) * parts)).sum()
    else:
        total = (parts * torch.tensor(ml.weights, dtype=z.dtype, device=z.device)).sum()
    if counts is not None:
        return total, parts.detach()        # summed over ranks before reporting
    report = torch.where(has > 0, parts, torch.full_like(parts, float("nan")))
    return total, report.detach()


def loss_fn(z: torch.Tensor, y: torch.Tensor, loss, log_vars=None,
            rows: int | None = None) -> torch.Tensor:
    """tlbridge/losses.py's formulas with torch's own functions (y: (N, K) float labels).
    rows: the global batch's size when z is one rank's share of it (data-parallel): the sum
    over this share divided by the global count, so the ranks' values add up to the mean."""
    if loss.name == "multi":
        return multi_loss(z, y, loss, log_vars)[0]
    if rows is not None:
        if loss.name == "bce":
            per = F.binary_cross_entropy_with_logits(z, y, reduction="sum")
        elif loss.name == "ce":
            return F.cross_entropy(z, y, label_smoothing=loss.label_smoothing,
                                   reduction="sum") / rows
        else:
            per = F.mse_loss(z, y, reduction="sum")
        return per / (rows * z.shape[1])
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
        loss = loss_fn(z, torch.from_numpy(y).to(z.device), loss,
                       getattr(net, "task_log_vars", None))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True) if named else []
    finally:
        net.train(was_training)
    return float(loss.detach()), {n: (torch.zeros_like(p) if g is None else g).detach().cpu().numpy()
                                  for (n, p), g in zip(named, grads)}

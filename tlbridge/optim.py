"""Optimizers, schedules and parameter groups: one written-down formula each, followed
exactly by both backends (docs/parity.md #6, #7).

The formulas are PyTorch's (torch.optim, single-tensor path), because they stay the same
under a changing learning rate; the Keras backend implements them op for op.

SGD (momentum mu, weight decay wd, nesterov):
    g <- g + wd * p
    b <- g                       (first step)       b <- mu * b + g   (later steps)
    d <- g + mu * b  (nesterov)  else  d <- b
    p <- p - lr * d
Adam (betas b1, b2, eps outside the square root, after bias correction; wd is L2):
    t <- t + 1;  g <- g + wd * p
    m <- m + (1 - b1) * (g - m);  v <- b2 * v + (1 - b2) * g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
AdamW: p <- p * (1 - lr * wd) first (decoupled), then Adam with wd = 0.
Keras' own SGD (v = mu v - lr g) and Adam ("epsilon hat" before bias correction) differ
from these, so they are not used.

A parameter is updated only when it has a gradient (not frozen); its step count t starts
at its first update, so gradual unfreezing behaves as in torch.

EMA (decay d; fine_tune(ema=d)), after every optimizer step, for every canonical tensor
(parameters and BatchNorm running statistics, as timm's ModelEmaV2), in numpy:
    e <- d * e + (1 - d) * w          e starts as the weights when fine_tune starts
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

from .errors import DataError

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise DataError(f"Unknown optimizer {self.name!r}. Expected one of {list(OPTIMIZERS)}.")
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise DataError("nesterov=True needs optimizer='sgd' with momentum > 0.")

    @property
    def slots(self) -> tuple:
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")


def param_groups(names: list[str], lr: float, group_lrs: dict | None) -> list[tuple[float, list[str]]]:
    """[(base lr, [names])]: each name goes to the first glob of `group_lrs` it matches,
    else to the default group with `lr`."""
    group_lrs = dict(group_lrs or {})
    groups: dict[str, list[str]] = {g: [] for g in group_lrs}
    rest: list[str] = []
    for name in names:
        for glob in group_lrs:
            if fnmatch.fnmatchcase(name, glob) or name.startswith(glob.rstrip("*").rstrip(".") + "."):
                groups[glob].append(name)
                break
        else:
            rest.append(name)
    for glob, members in groups.items():
        if not members:
            raise DataError(f"group_lrs key {glob!r} matches no parameter. Expected globs over "
                            f"canonical names such as 'backbone.*' or 'head.*'.")
    out = [(float(group_lrs[g]), m) for g, m in groups.items()]
    if rest:
        out.append((float(lr), rest))
    return out


def ema_update(ema: dict, weights: dict, decay: float) -> None:
    """e <- d * e + (1 - d) * w, in place, in each tensor's own dtype."""
    for k, e in ema.items():
        e *= decay
        e += (1.0 - decay) * weights[k]


# ---- schedules: factor(step, total_steps) multiplying every group's base lr ----------------

Schedule = Callable[[int, int], float]


def constant() -> Schedule:
    return lambda step, total: 1.0


def step_decay(every: int, gamma: float = 0.1) -> Schedule:
    """lr * gamma ** (step // every), with `every` in optimizer steps."""
    return lambda step, total: gamma ** (step // every)


def cosine(min_factor: float = 0.0) -> Schedule:
    return lambda step, total: min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def warmup(steps: int, then: Schedule | None = None) -> Schedule:
    """Linear warm-up from lr/steps to lr over `steps`, then `then` over the remaining steps."""
    after = then or constant()

    def factor(step, total):
        if step < steps:
            return (step + 1) / steps
        return after(step - steps, max(total - steps, 1))
    return factor


def make_schedule(spec, steps_per_epoch: int) -> Schedule:
    """None/'constant', 'cosine', ('step', every_epochs, gamma), ('warmup', epochs, then), or a callable."""
    if spec is None or spec == "constant":
        return constant()
    if callable(spec):
        return spec
    if spec == "cosine":
        return cosine()
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "step":
        return step_decay(max(1, int(spec[1] * steps_per_epoch)), spec[2] if len(spec) > 2 else 0.1)
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "warmup":
        then = make_schedule(spec[2], steps_per_epoch) if len(spec) > 2 else None
        return warmup(max(1, int(spec[1] * steps_per_epoch)), then)
    raise DataError(f"Unknown schedule {spec!r}. Expected None, 'constant', 'cosine', "
                    "('step', every_epochs, gamma), ('warmup', epochs, then) or a callable "
                    "factor(step, total_steps).")

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

Optimizers are values (tl.optim.SGD(...), Adam, AdamW), as torch.optim, optax and
keras.optimizers have them: the learning rate, its schedule and parameter groups, the L2-SP
regulariser and the weight average (EMA, as Keras' `use_ema`) travel inside the value.

EMA (decay d; tl.optim.SGD(..., ema=d)), after every optimizer step, for every canonical tensor
(parameters and BatchNorm running statistics, as timm's ModelEmaV2), in numpy:
    e <- d * e + (1 - d) * w          e starts as the weights when fine_tune starts
computed as e + (1 - d) * (w - e), so a tensor that never moves (a frozen base, LoRA's) keeps
its exact value: d * w + (1 - d) * w can round an ulp away from w.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import KW_ONLY, asdict, dataclass, fields
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


def _number(v, what: str, low: float = 0.0, strict: bool = False, high: float = math.inf) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < low or (strict and v == low) or v >= high:
        bound = f"> {low}" if strict else f">= {low}"
        raise DataError(f"Expected {what} as a finite number {bound}"
                        f"{'' if high == math.inf else f' and < {high}'}; received {v!r}.")
    return float(v)


@dataclass(frozen=True)
class L2SP:
    """L2-SP (Li et al., 2018): alpha/2 ||w - w0||^2 over the backbone (w0 = weights when
    fine_tune starts) plus beta/2 ||w||^2 over the head, trainable parameters only."""

    alpha: float = 0.01
    beta: float = 0.01


@dataclass(frozen=True)
class EMA:
    """A moving average of every weight and BatchNorm statistic after each step (formula
    above); swap=True puts it into the model when fine_tune ends."""

    decay: float = 0.999
    swap: bool = True

    def __post_init__(self):
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) < 1.0:
            raise DataError(f"Expected ema as a decay in (0, 1), e.g. 0.999, or None; received "
                            f"{d!r}.")
        object.__setattr__(self, "decay", float(d))
        object.__setattr__(self, "swap", bool(self.swap))


def regularizer(spec) -> L2SP | None:
    if spec is None:
        return None
    if spec == "l2sp":
        return L2SP()
    if isinstance(spec, L2SP):
        return spec
    if isinstance(spec, dict) and spec.get("name", "l2sp") == "l2sp":
        return L2SP(float(spec.get("alpha", 0.01)), float(spec.get("beta", 0.01)))
    raise DataError(f"Unknown regularizer {spec!r}. Expected None, 'l2sp', tl.L2SP(alpha, beta) or "
                    "{'name': 'l2sp', 'alpha': ..., 'beta': ...}.")


@dataclass(frozen=True, repr=False)
class _Optimizer:
    """What SGD, Adam and AdamW share: the base learning rate (each class's first field),
    parameter groups ({glob: lr}), a schedule, the L2-SP regulariser and the EMA (keyword-only:
    they come after each optimizer's own positional fields)."""

    _: KW_ONLY
    groups: dict | None = None
    schedule: object = None
    regularizer: object = None
    ema: object = None
    name = ""

    def _check_common(self):
        _number(self.lr, f"{type(self).__name__} lr", strict=True)
        _number(self.weight_decay, "weight_decay")
        groups = self.groups
        if groups is not None:
            if isinstance(groups, dict):
                groups = tuple(groups.items())
            if not all(isinstance(g, tuple) and len(g) == 2 and isinstance(g[0], str) for g in groups):
                raise DataError(f"Expected groups as a dict {{glob: lr}}, e.g. {{'backbone.*': "
                                f"1e-4}}; received {self.groups!r}.")
            for glob, lr in groups:
                _number(lr, f"the learning rate of group {glob!r}", strict=True)
            object.__setattr__(self, "groups", groups)
        check_schedule(self.schedule)
        object.__setattr__(self, "regularizer", regularizer(self.regularizer))
        if self.ema is not None and not isinstance(self.ema, EMA):
            object.__setattr__(self, "ema", EMA(self.ema))

    def config(self) -> "OptimizerConfig":
        """The update formula's constants, as the backends' trainers take them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        """Its own fields first, then the shared ones that are set: SGD(lr=0.01, momentum=0.9)."""
        own = [f for f in fields(self) if not f.kw_only]
        shared = [f for f in fields(self) if f.kw_only and getattr(self, f.name) is not None]
        args = [f"{f.name}={getattr(self, f.name)!r}" for f in own + shared]
        return f"{type(self).__name__}({', '.join(args)})"

    def param_groups(self, names: list[str]) -> list[tuple[float, list[str]]]:
        return param_groups(names, self.lr, dict(self.groups or ()))

    def describe(self) -> dict:
        """JSON-ready: what a checkpoint records and a resume must match."""
        out = {k: v for k, v in asdict(self).items() if k not in ("schedule", "regularizer", "ema")}
        out["name"] = self.name
        out["groups"] = None if self.groups is None else [list(g) for g in self.groups]
        out["schedule"] = describe_schedule(self.schedule)
        out["regularizer"] = None if self.regularizer is None else asdict(self.regularizer)
        out["ema"] = None if self.ema is None else asdict(self.ema)
        return json.loads(json.dumps(out))


@dataclass(frozen=True, repr=False)
class SGD(_Optimizer):
    """torch.optim.SGD's formula (above): momentum, nesterov, L2 weight decay."""

    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    name = "sgd"

    def __post_init__(self):
        self._check_common()
        _number(self.momentum, "momentum")
        self.config()

    def config(self) -> "OptimizerConfig":
        return OptimizerConfig("sgd", float(self.momentum), bool(self.nesterov),
                               float(self.weight_decay))


@dataclass(frozen=True, repr=False)
class Adam(_Optimizer):
    """torch.optim.Adam's formula (above): eps after bias correction, L2 weight decay."""

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name = "adam"

    def __post_init__(self):
        self._check_common()
        try:
            b1, b2 = (float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise DataError(f"Expected betas as a pair (b1, b2); received {self.betas!r}.") from None
        _number(b1, "betas[0]", high=1.0)
        _number(b2, "betas[1]", high=1.0)
        object.__setattr__(self, "betas", (b1, b2))
        _number(self.eps, "eps", strict=True)

    def config(self) -> "OptimizerConfig":
        return OptimizerConfig(self.name, 0.9, False, float(self.weight_decay), tuple(self.betas),
                               float(self.eps))


@dataclass(frozen=True, repr=False)
class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay, p <- p * (1 - lr * wd) before Adam
    (torch's default weight_decay 1e-2)."""

    weight_decay: float = 1e-2
    name = "adamw"


_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def resolve(optimizer) -> _Optimizer:
    """fine_tune's optimizer=: a name (the value with its defaults) or a value."""
    if isinstance(optimizer, _Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in _BY_NAME:
        return _BY_NAME[optimizer.lower()]()
    raise DataError(f"Unknown optimizer {optimizer!r}. Expected one of {list(OPTIMIZERS)} or a "
                    f"value such as tl.optim.SGD(lr=1e-3, momentum=0.9), tl.optim.Adam(lr=1e-3).")


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
            raise DataError(f"Optimizer group {glob!r} matches no parameter. Expected globs over "
                            f"canonical names such as 'backbone.*' or 'head.*'.")
    out = [(float(group_lrs[g]), m) for g, m in groups.items()]
    if rest:
        out.append((float(lr), rest))
    return out


def ema_update(ema: dict, weights: dict, decay: float) -> None:
    """e <- d * e + (1 - d) * w, in place, in each tensor's own dtype, as e + (1 - d)(w - e):
    exact for a tensor that has not moved (frozen), which d * e + (1 - d) * w is not."""
    for k, e in ema.items():
        e += (1.0 - decay) * (weights[k] - e)


# ---- schedules: factor(step, total_steps) multiplying every group's base lr ----------------

Schedule = Callable[[int, int], float]


class _Schedule:
    """A schedule value: `bind(steps_per_epoch)` gives factor(step, total_steps)."""

    def bind(self, steps_per_epoch: int) -> Schedule:
        raise NotImplementedError

    def __call__(self, step: int, total: int) -> float:     # epochs-free ones are factors too
        return self.bind(1)(step, total)


@dataclass(frozen=True)
class Constant(_Schedule):
    def bind(self, steps_per_epoch: int) -> Schedule:
        return constant()


@dataclass(frozen=True)
class Cosine(_Schedule):
    """Half a cosine from 1 to min_factor over the whole run."""

    min_factor: float = 0.0

    def bind(self, steps_per_epoch: int) -> Schedule:
        return cosine(self.min_factor)


@dataclass(frozen=True)
class StepDecay(_Schedule):
    """lr * gamma ** (epochs done // every_epochs), counted in optimizer steps."""

    every_epochs: float = 1
    gamma: float = 0.1

    def bind(self, steps_per_epoch: int) -> Schedule:
        return step_decay(max(1, int(self.every_epochs * steps_per_epoch)), self.gamma)


@dataclass(frozen=True)
class Warmup(_Schedule):
    """Linear warm-up over `epochs`, then `then` (a schedule value; None: constant)."""

    epochs: float = 1
    then: object = None

    def bind(self, steps_per_epoch: int) -> Schedule:
        after = None if self.then is None else make_schedule(self.then, steps_per_epoch)
        return warmup(max(1, int(self.epochs * steps_per_epoch)), after)


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


def as_value(spec):
    """A schedule value from any accepted form: None/'constant', 'cosine', ('step',
    every_epochs, gamma), ('warmup', epochs, then), a value, or a callable factor."""
    if spec is None or spec == "constant":
        return Constant()
    if isinstance(spec, _Schedule) or (callable(spec) and not isinstance(spec, (str, tuple, list))):
        return spec
    if spec == "cosine":
        return Cosine()
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "step" and len(spec) >= 2:
        return StepDecay(spec[1], spec[2] if len(spec) > 2 else 0.1)
    if isinstance(spec, (tuple, list)) and spec and spec[0] == "warmup" and len(spec) >= 2:
        return Warmup(spec[1], as_value(spec[2]) if len(spec) > 2 else None)
    raise DataError(f"Unknown schedule {spec!r}. Expected a value (tl.optim.Cosine(), "
                    "StepDecay(every_epochs, gamma), Warmup(epochs, then)), None, 'constant', "
                    "'cosine', ('step', every_epochs, gamma), ('warmup', epochs, then) or a "
                    "callable factor(step, total_steps).")


def check_schedule(spec) -> None:
    as_value(spec)


def make_schedule(spec, steps_per_epoch: int) -> Schedule:
    value = as_value(spec)
    return value.bind(steps_per_epoch) if isinstance(value, _Schedule) else value


def describe_schedule(spec):
    """JSON-ready identity of a schedule (a callable by its qualified name)."""
    value = as_value(spec)
    if isinstance(value, _Schedule):
        return {"schedule": type(value).__name__,
                **{f.name: describe_schedule(getattr(value, f.name))
                   if f.name == "then" and getattr(value, f.name) is not None
                   else getattr(value, f.name) for f in fields(value)}}
    return {"callable": f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"}

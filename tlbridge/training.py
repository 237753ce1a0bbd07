"""fine_tune: one training loop, written once in numpy terms, driving either backend.

Both backends see the same batches (tl.data, seeded per epoch), the same learning rate at
every step (schedules are computed here), the same freeze state per epoch (gradual
unfreezing is resolved here) and follow the same optimizer formulas (tlbridge/optim.py).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import api, data as tldata, freezing, metrics, optim, registry
from . import weights as wio
from .errors import CheckpointError, DataError, TrainingDivergedError
from .history import History
from .model import TransferModel

CHECKPOINT_FORMAT = "tlbridge.checkpoint/1"
CHECKPOINT_NAME = "last.safetensors"


@dataclass(frozen=True)
class L2SP:
    """L2-SP (Li et al., 2018): alpha/2 ||w - w0||^2 over the backbone (w0 = weights when
    fine_tune starts) plus beta/2 ||w||^2 over the head, trainable parameters only."""

    alpha: float = 0.01
    beta: float = 0.01


@dataclass(frozen=True)
class EarlyStopping:
    monitor: str = "val_loss"
    patience: int = 3
    mode: str = "auto"          # "min" | "max" | "auto" (max for accuracy/auc, else min)
    min_delta: float = 0.0
    restore_best: bool = True

    def better(self, new: float, best: float) -> bool:
        mode = self.mode
        if mode == "auto":
            mode = "max" if any(k in self.monitor for k in ("acc", "auc")) else "min"
        if math.isnan(new):
            return False
        if math.isnan(best):
            return True
        return new > best + self.min_delta if mode == "max" else new < best - self.min_delta


def _as_dataset(d, batch_size, shuffle, seed, dtype, what) -> tldata.Dataset:
    if isinstance(d, tldata.Dataset):
        d.dtype = dtype
        return d
    if isinstance(d, (tuple, list)) and len(d) == 2:
        return tldata.arrays(d[0], d[1], batch_size=batch_size, shuffle=shuffle, seed=seed, dtype=dtype)
    raise DataError(f"Expected {what} as an (x, y) pair of numpy arrays or a tl.data dataset; "
                    f"received {type(d).__name__}.")


def _regularizer(spec):
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


def _early(spec):
    if spec is None or isinstance(spec, EarlyStopping):
        return spec
    if isinstance(spec, int):
        return EarlyStopping(patience=spec)
    if isinstance(spec, dict):
        return EarlyStopping(**spec)
    raise DataError(f"Expected early_stopping as None, a patience int, a dict or tl.EarlyStopping; "
                    f"received {spec!r}.")


def _unfreeze_plan(m: TransferModel, plan, epochs: int):
    """Frozen set per epoch: with a plan, epoch e trains the union of specs with key <= e."""
    if plan is None:
        return None
    names = api._param_names(m)
    keys = sorted(int(k) for k in plan)
    if not keys or keys[0] != 0:
        raise DataError(f"Expected an unfreeze plan starting at epoch 0, e.g. {{0: 'head.*', 2: "
                        f"'backbone.layer4.*', 4: 'all'}}; received keys {keys}.")
    frozen_at, trainable = [], set()
    for e in range(epochs):
        if e in plan:
            trainable |= freezing.resolve(plan[e], names)
        frozen_at.append(set(names) - trainable)
    return frozen_at


class _Progress:
    def __init__(self, enabled, total, desc):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)

    def update(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self, **info):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()})
            self.bar.close()


def evaluate(m: TransferModel, data, *, batch_size: int = 64) -> dict:
    """loss (mean BCE from logits), accuracy (0.5 threshold / argmax), ROC AUC for one output."""
    ds = _as_dataset(data, batch_size, False, 0, m.dtype, "data")
    x, y = ds.as_arrays()
    return metrics.scores(api.logits(m, x, batch_size=batch_size), y)


def fine_tune(model: TransferModel, train, *, val=None, epochs: int = 1, batch_size: int = 32,
              optimizer="sgd", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
              nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8, schedule=None,
              group_lrs: dict | None = None, unfreeze: dict | None = None, regularizer=None,
              early_stopping=None, seed: int = 0, progress: bool = True, checkpoint_dir=None,
              resume: bool = False, feature_cache="auto",
              callbacks: list[Callable] | None = None) -> History:
    """Fine-tune `model` in place on `train`; the same call gives the same result on both backends.

    feature_cache="auto": in epochs where the whole backbone is frozen and the data has no
    augmentation, backbone features are computed once and only the head is trained on them.
    callbacks: functions cb(event, info) for events "step" and "epoch".
    """
    m = api._check_model(model)
    api._need_head(m, "fine_tune")
    be = registry.load(m.backend)
    ds = _as_dataset(train, batch_size, True, seed, m.dtype, "train")
    vds = None if val is None else _as_dataset(val, batch_size, False, seed, m.dtype, "val")
    if ds.num_outputs != m.num_outputs:
        raise DataError(f"Expected labels with {m.num_outputs} column(s) (the model's outputs); "
                        f"received {ds.num_outputs}.")
    if ds.image_shape != m.input_shape:
        raise DataError(f"Expected images of shape {m.input_shape}; the data has {ds.image_shape}.")
    cfg = optimizer if isinstance(optimizer, optim.OptimizerConfig) else optim.OptimizerConfig(
        str(optimizer).lower(), momentum, nesterov, weight_decay, tuple(betas), eps)
    reg = _regularizer(regularizer)
    stop = _early(early_stopping)
    names = api._param_names(m)
    groups = optim.param_groups(names, lr, group_lrs)
    steps = len(ds)
    total_steps = epochs * steps
    factor = optim.make_schedule(schedule, steps)
    frozen_at = _unfreeze_plan(m, unfreeze, epochs)
    anchors = None
    if reg is not None:
        w = api.get_weights(m)
        anchors = {n: w[n] for n in names if n.startswith("backbone.")}

    history, start = History(), 0
    trainer = be.make_trainer(m, cfg, groups, None if reg is None else (reg.alpha, reg.beta), anchors)
    ckpt = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)
    if resume and ckpt and os.path.exists(ckpt):
        start, history, anchors = _restore(m, be, trainer, ckpt, reg, anchors)
    best = {"value": math.nan, "weights": None, "epoch": -1}
    good = api.get_weights(m), set(m.frozen)
    cache = None
    callbacks = list(callbacks or [])

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if frozen_at is not None:
            m.frozen = set(frozen_at[epoch])
            be.apply_freeze(m)
        be.seed_everything(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        backbone_frozen = all(n in m.frozen for n in names if n.startswith("backbone."))
        use_cache = feature_cache is True or (feature_cache == "auto" and backbone_frozen
                                              and ds.augment is None)
        if use_cache and not backbone_frozen:
            raise DataError("feature_cache=True needs the whole backbone frozen.")
        if use_cache and cache is None:
            xa, ya = ds.as_arrays()
            cache = (api.features(m, xa), ya)
        bar = _Progress(progress, steps, f"epoch {epoch + 1}/{epochs}")
        losses = []
        for step, (xb, yb) in enumerate(_batches(ds, epoch, cache if use_cache else None)):
            global_step = epoch * steps + step
            lrs = [base * factor(global_step, total_steps) for base, _ in groups]
            fn = trainer.head_step if use_cache else trainer.step
            loss, penalty = fn(xb.astype(m.dtype, copy=False), yb.astype(m.dtype, copy=False), lrs)
            if not (math.isfinite(loss) and math.isfinite(penalty)):
                bar.close()
                api.set_weights(m, good[0])
                m.frozen = good[1]
                be.apply_freeze(m)
                where = f"checkpoint {ckpt} (end of epoch {epoch})" if ckpt and os.path.exists(ckpt) \
                    else "the weights before this epoch"
                raise TrainingDivergedError(
                    f"Training diverged: the loss is {loss} at epoch {epoch}, step {step} "
                    f"(lr {lrs[-1]:.3g}). Expected a finite loss; the model was restored to {where}. "
                    "Lower the learning rate, add warm-up, or check the data.", epoch, step)
            losses.append(loss)
            bar.update(loss)
            for cb in callbacks:
                cb("step", {"epoch": epoch, "step": step, "loss": loss, "lr": lrs})
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": lrs[-1],
                  "trainable": len(names) - len(m.frozen), "cached": bool(use_cache)}
        if reg is not None:
            record["penalty"] = penalty
        if vds is not None:
            record.update({f"val_{k}": v for k, v in evaluate(m, vds).items()})
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        bar.close(**{k: v for k, v in record.items() if k in ("loss", "val_loss", "val_accuracy")})
        good = api.get_weights(m), set(m.frozen)
        stop_now = False
        if stop is not None:
            value = record.get(stop.monitor, math.nan)
            if stop.monitor not in record:
                raise DataError(f"early_stopping monitors {stop.monitor!r}, which the history does "
                                f"not have; expected one of {sorted(record)} (pass val= for val_*).")
            if stop.better(value, best["value"]):
                best = {"value": value, "weights": good, "epoch": epoch}
            elif epoch - best["epoch"] >= stop.patience:
                stop_now = True
        if ckpt:
            _save(m, trainer, ckpt, epoch, history, anchors, cfg, seed)
        for cb in callbacks:
            cb("epoch", record)
        if stop_now:
            break
    if stop is not None and stop.restore_best and best["weights"] is not None:
        api.set_weights(m, best["weights"][0])
        m.frozen = best["weights"][1]
        be.apply_freeze(m)
        history.best_epoch = best["epoch"]
    return history


def _batches(ds: tldata.Dataset, epoch: int, cache):
    if cache is None:
        yield from ds.epoch(epoch)
        return
    feats, labels = cache
    order, _ = ds.plan(epoch)
    b = ds.batch_size
    for k in range(len(ds)):
        idx = order[k * b:(k + 1) * b]
        yield feats[idx], labels[idx]


def _save(m, trainer, path, epoch, history, anchors, cfg, seed):
    tensors = {f"model/{k}": v for k, v in api.get_weights(m).items()}
    tensors.update({f"optim/{k}": v for k, v in trainer.state_dict().items()})
    if anchors:
        tensors.update({f"anchor/{k}": v for k, v in anchors.items()})
    meta = {"format": CHECKPOINT_FORMAT, "backend": m.backend, "spec": m.spec.to_json(),
            "frozen": json.dumps(sorted(m.frozen)), "epoch": str(epoch),
            "history": history.to_json(), "optimizer": json.dumps(asdict(cfg)),
            "seed": str(seed)}
    wio.save_file(path, tensors, meta)


def _restore(m, be, trainer, path, reg, anchors):
    tensors, meta = wio.load_file(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"Expected a fine_tune checkpoint ({CHECKPOINT_FORMAT}) in {path!r}; "
                              f"received format {meta.get('format')!r}.")
    spec = json.loads(meta["spec"])
    if spec["backbone"] != m.backbone_name:
        raise CheckpointError(f"The checkpoint {path!r} is of backbone {spec['backbone']!r}; this "
                              f"model is {m.backbone_name!r}. Use another checkpoint_dir.")
    api.set_weights(m, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    m.frozen = set(json.loads(meta["frozen"]))
    be.apply_freeze(m)
    trainer.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("optim/")})
    saved_anchors = {k[7:]: v for k, v in tensors.items() if k.startswith("anchor/")}
    if reg is not None and saved_anchors:
        anchors = saved_anchors
        trainer.set_anchors(anchors)
    return int(meta["epoch"]) + 1, History.from_json(meta["history"]), anchors

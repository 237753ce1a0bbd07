"""fine_tune: one training loop, written once in numpy terms, driving either backend.

Both backends see the same batches (tl.data, seeded per epoch), the same learning rate at
every step (schedules are computed here), the same freeze state per epoch (gradual
unfreezing is resolved here) and follow the same optimizer formulas (tlbridge/optim.py).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import api, data as tldata, devices, freezing, fusion, gate, losses, multitask, optim, \
    parallel, registry
from . import weights as wio
from .errors import (CheckpointError, DataError, DistributedError, FreezeSpecError,
                     TrainingDivergedError)
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
    mode: str = "auto"          # "min" | "max" | "auto" (max for accuracy/auc/top5, else min)
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if not isinstance(self.monitor, str) or not self.monitor:
            raise DataError(f"Expected EarlyStopping monitor as a history key such as 'val_loss'; "
                            f"received {self.monitor!r}.")
        if self.mode not in ("min", "max", "auto"):
            raise DataError(f"Expected EarlyStopping mode 'min', 'max' or 'auto'; received "
                            f"{self.mode!r}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, (int, np.integer)) \
                or self.patience < 0:
            raise DataError(f"Expected EarlyStopping patience as an int >= 0 (epochs without "
                            f"improvement); received {self.patience!r}.")
        if not (isinstance(self.min_delta, (int, float)) and math.isfinite(self.min_delta)
                and self.min_delta >= 0):
            raise DataError(f"Expected EarlyStopping min_delta as a finite number >= 0; received "
                            f"{self.min_delta!r}.")

    def better(self, new: float, best: float) -> bool:
        mode = self.mode
        if mode == "auto":
            key = self.monitor[:-4] if self.monitor.endswith("_ema") else self.monitor
            mode = "max" if key.endswith(("accuracy", "auc", "top5")) else "min"
        if math.isnan(new):
            return False
        if math.isnan(best):
            return True
        return new > best + self.min_delta if mode == "max" else new < best - self.min_delta


def _as_dataset(d, batch_size, shuffle, seed, dtype, what, m=None, spec=None) -> tldata.Dataset:
    if isinstance(d, tldata.Dataset):
        d.dtype = dtype
        return d
    if isinstance(d, (tuple, list)) and len(d) == 2 and m is not None and (
            isinstance(d[1], dict) or isinstance(spec, multitask.MultiLoss)):
        d = (d[0], api.labels_for(m, d[1], len(d[0]), spec, f"{what} labels"))
    if isinstance(d, (tuple, list)) and len(d) == 2:
        return tldata.arrays(d[0], d[1], batch_size=batch_size, shuffle=shuffle, seed=seed, dtype=dtype)
    raise DataError(f"Expected {what} as an (x, y) pair of numpy arrays or a tl.data dataset; "
                    f"received {type(d).__name__}.")


def _check_data(m: TransferModel, ds: tldata.Dataset, what: str,
                loss: losses.Loss | None = None) -> tldata.Dataset:
    """The data must fit the model before any work is done: label columns and image shape;
    with a loss, labels in its form: (N, K) floats (class indices become one-hot rows, in a
    shallow copy of the dataset: the caller's is left as it was)."""
    if isinstance(loss, multitask.MultiLoss):
        if ds.num_outputs != m.num_outputs:
            raise DataError(f"Expected {what} labels with {m.num_outputs} columns (the tasks' "
                            f"outputs side by side); received {ds.num_outputs}. Pass labels as "
                            f"a dict {{task: labels}}.")
        multitask.check_packed(ds.labels, loss, f"{what} labels")
        if ds.image_shape != tuple(m.input_shape):
            raise DataError(f"Expected {what} images of shape {tuple(m.input_shape)} (the "
                            f"model's input_shape); received {ds.image_shape}.")
        return ds
    indices = loss is not None and loss.name == "ce" and ds.num_outputs == 1
    if ds.num_outputs != m.num_outputs and not indices:
        raise DataError(
            f"Expected {what} labels with {m.num_outputs} column(s) (the model's outputs); "
            f"received {ds.num_outputs}. Pass labels of shape (N, {m.num_outputs})"
            f"{' or (N,)' if m.num_outputs == 1 or indices else ''}, or give the model "
            f"{ds.num_outputs} outputs with tl.replace_head(m, {ds.num_outputs}).")
    if loss is not None:
        import copy
        y = losses.prepare_labels(ds.labels, ds.num_samples, m.num_outputs, loss.name,
                                  "float64", f"{what} labels")
        ds = copy.copy(ds)
        ds.labels, ds.num_outputs = y, y.shape[1]
    if ds.num_outputs != m.num_outputs:
        raise DataError(
            f"Expected {what} labels with {m.num_outputs} column(s) (the model's outputs); "
            f"received {ds.num_outputs}. Pass labels of shape (N, {m.num_outputs})"
            f"{' or (N,)' if m.num_outputs == 1 else ''}, or give the model "
            f"{ds.num_outputs} outputs with tl.replace_head(m, {ds.num_outputs}).")
    if m.input_shape is not None and ds.image_shape != tuple(m.input_shape):
        raise DataError(
            f"Expected {what} images of shape {tuple(m.input_shape)} (the model's input_shape); "
            f"received {ds.image_shape}. Resize the images (image_folder's image_size), or load "
            f"the backbone with input_shape={ds.image_shape}.")
    return ds


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
        unknown = sorted(set(spec) - {"monitor", "patience", "mode", "min_delta", "restore_best"})
        if unknown:
            raise DataError(f"Unknown early_stopping key(s) {unknown}; expected monitor, patience, "
                            f"mode, min_delta, restore_best.")
        return EarlyStopping(**spec)
    raise DataError(f"Expected early_stopping as None, a patience int, a dict or tl.EarlyStopping; "
                    f"received {spec!r}.")


def _plan_key(k) -> int:
    """An epoch key of an unfreeze plan: an int, or an int-like string (plans read from JSON)."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        epoch = int(k)
    elif isinstance(k, str) and k.strip().lstrip("+").isdigit():
        epoch = int(k)
    else:
        raise DataError(f"Expected unfreeze plan keys as epoch numbers (ints >= 0, or int-like "
                        f"strings such as '2'); received {k!r}.")
    if epoch < 0:
        raise DataError(f"Expected unfreeze plan keys as epoch numbers >= 0; received {k!r}.")
    return epoch


def _unfreeze_plan(m: TransferModel, plan, epochs: int):
    """Frozen set per epoch: with a plan, epoch e trains the union of specs with key <= e."""
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise DataError(f"Expected unfreeze as a dict {{epoch: spec}}, e.g. {{0: 'head', 2: "
                        f"'backbone.layer4', 4: 'all'}}; received {type(plan).__name__}.")
    names = api._param_names(m)
    normalised = {}
    for k, spec in plan.items():
        e = _plan_key(k)
        if e in normalised:
            raise DataError(f"Expected each epoch once in the unfreeze plan; received epoch {e} "
                            f"twice (keys {[key for key in plan if _plan_key(key) == e]}).")
        normalised[e] = spec
    plan = normalised
    keys = sorted(plan)
    if not keys or keys[0] != 0:
        raise DataError(f"Expected an unfreeze plan starting at epoch 0, e.g. {{0: 'head.*', 2: "
                        f"'backbone.layer4.*', 4: 'all'}}; received keys {keys}.")
    opened = {e: freezing.resolve(spec, names) for e, spec in plan.items()}  # every spec checked
    frozen_at, trainable = [], set()
    for e in range(epochs):
        trainable |= opened.get(e, set())
        frozen_at.append(set(names) - trainable)
    return frozen_at


class _Progress:
    """A tqdm bar per epoch; without tqdm (an install that left it out), one plain line per
    epoch on stderr, so progress=True never needs an optional package."""

    def __init__(self, enabled, total, desc):
        self.bar = None
        self.text = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.text, self.steps = desc, 0
            else:
                self.bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)

    def update(self, loss):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.text is not None:
            self.steps += 1

    def close(self, **info):
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in info.items()})
            self.bar.close()
            self.bar = None
        elif self.text is not None:
            import sys
            parts = [f"{self.steps} steps"] + [f"{k}={v:.4f}" for k, v in info.items()]
            print(f"{self.text}: {', '.join(parts)}", file=sys.stderr, flush=True)
            self.text = None


def evaluate(m: TransferModel, data, *, batch_size: int = 64, loss: str | None = None,
             label_smoothing: float | None = None, task_weights=None) -> dict:
    """The head's loss (or `loss=`) and its metrics (tlbridge/losses.py, `scores`): bce:
    accuracy (0.5 threshold / argmax) and ROC AUC for one output; ce: accuracy and top-5
    accuracy (K > 5); mse: mean absolute error. A FusedModel is scored with BCE. A multi-task
    head: the weighted total and every task's loss and metrics ("<task>_<metric>")."""
    if not isinstance(m, fusion.FusedModel):
        m = api._check_model(m)
        api._need_head(m, "evaluate")
        spec = api.loss_spec(m, loss, label_smoothing, task_weights)
    else:
        spec = losses.Loss()
        if m.preprocess == "images" and isinstance(data, (tuple, list)) and len(data) == 2:
            data = (np.asarray(data[0]).astype(np.float32), data[1])  # 0-255 stay exact integers
    ds = _check_data(m, _as_dataset(data, batch_size, False, 0, m.dtype, "data", m, spec),
                     "data", spec)
    return _evaluate(m, ds, batch_size, spec)


def _evaluate(m: TransferModel, ds: tldata.Dataset, batch_size: int,
              loss: losses.Loss | None = None) -> dict:
    """Scores over the whole set, computed one batch at a time (no full decoded copy)."""
    zs, ys = [], []
    for _, xb, yb in ds.indexed_batches():
        zs.append(api.logits(m, xb, batch_size=batch_size))
        ys.append(yb)
    if not zs:
        raise DataError(f"Expected at least one readable image; received none of "
                        f"{ds.num_samples} (see ds.skipped).")
    z, y = np.concatenate(zs), np.concatenate(ys)
    if isinstance(loss, multitask.MultiLoss):
        log_vars = api.get_weights(m)[multitask.LOG_VARS] if loss.uncertainty else None
        return multitask.scores(z, y, loss, log_vars)
    return losses.scores(z, y, loss or losses.Loss())


def fine_tune(model: TransferModel, train, *, val=None, epochs: int = 1, batch_size: int = 32,
              optimizer="sgd", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
              nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8, schedule=None,
              group_lrs: dict | None = None, unfreeze: dict | None = None, regularizer=None,
              early_stopping=None, seed: int = 0, progress: bool = True, checkpoint_dir=None,
              resume: bool = False, feature_cache="auto", ema: float | None = None,
              ema_swap: bool = True, callbacks: list[Callable] | None = None,
              loss: str | None = None, label_smoothing: float | None = None,
              task_weights=None, precision: str | None = None, distributed: bool | None = None,
              replicas=None, bn_sync: str = "global") -> History:
    """Fine-tune `model` in place on `train`; the same call gives the same result on both backends.

    feature_cache="auto": in epochs where the whole backbone is frozen and the data has no
    augmentation, backbone features are computed once (batch by batch, stored by sample index)
    and only the head is trained on them; True insists, and is refused up front when an epoch
    would train the backbone or the data is augmented.
    unfreeze: {epoch: spec}; keys may be ints or int-like strings (a plan read from JSON).
    resume=True continues after the checkpoint's last complete epoch, on either backend, with
    its optimizer state (step counts included) and early-stopping state; a call with another
    optimizer, seed or early_stopping than the checkpoint's is refused (CheckpointError).
    Everything that can be checked before training is: the data against the model (train and
    val), the unfreeze plan, that every epoch trains something, the early-stopping monitor.
    callbacks: functions cb(event, info) for events "step" and "epoch".
    ema=d: an exponential moving average of every weight and BatchNorm statistic, updated
    after each step with the formula in tlbridge/optim.py (numpy, so the same on both
    backends); with val, the history also holds val_*_ema per epoch; the average is kept in
    checkpoints, is `history.ema_weights`, and replaces the model's weights at the end unless
    ema_swap=False. Each step copies the weights out once (about 4% of a ResNet-50 step).
    loss: the head's own (replace_head(..., loss=)) unless given: "bce", "ce" (with
    label_smoothing), "mse" (tlbridge/losses.py); labels in its form (class indices for "ce").
    A multi-task head (tl.replace_heads) takes labels {task: labels} and task_weights (a dict,
    or "uncertainty": task_log_vars trains too); the history holds loss_<task> per epoch,
    val_<task>_<metric>, and log_var_<task> under uncertainty.
    A gated FusedModel (tl.fuse(..., method="gate")) trains its gate here; its members stay
    frozen.
    precision: "fp32" (default: the model's own dtype), or mixed "bf16" / "fp16" (float32 master
    weights, BatchNorm and loss in float32; fp16 with dynamic loss scaling, GPU only).
    Data-parallel (tlbridge/parallel.py): under torchrun (WORLD_SIZE > 1, or distributed=True)
    a torch model trains on its rank's share of each global batch and gradients are summed
    over ranks; a Keras model trains over `replicas` devices (an int, or a
    tf.distribute.MirroredStrategy). bn_sync: "global" (BatchNorm statistics over the whole
    global batch: the one-process result) or "local" (each share's own, frameworks' default).
    Rank 0 writes the checkpoints.
    """
    if isinstance(model, fusion.FusedModel):
        if model.gate is None:
            raise DataError(
                f"fine_tune trains the gate of a gated fusion (method='gate'); received a "
                f"FusedModel with method={model.method!r}, whose weights tl.fuse fits. "
                f"Fine-tune the members before fusing them.")
        model = model.gate
    m = api._check_model(model)
    api._need_head(m, "fine_tune")
    be = registry.load(m.backend)
    loss_spec = api.loss_spec(m, loss, label_smoothing, task_weights)
    precision = devices.check_precision(precision, m.dtype, m.device)
    bn_sync = parallel.check_bn_sync(bn_sync)
    plan = _parallel_plan(m, distributed, replicas, bn_sync)
    ds = _check_data(m, _as_dataset(train, batch_size, True, seed, m.dtype, "train", m,
                                    loss_spec), "train", loss_spec)
    vds = None if val is None else _check_data(
        m, _as_dataset(val, batch_size, False, seed, m.dtype, "val", m, loss_spec), "val",
        loss_spec)
    cfg = optimizer if isinstance(optimizer, optim.OptimizerConfig) else optim.OptimizerConfig(
        str(optimizer).lower(), momentum, nesterov, weight_decay, tuple(betas), eps)
    reg = _regularizer(regularizer)
    stop = _early(early_stopping)
    ema = _check_ema(ema, ema_swap, stop)
    if stop is not None:
        _check_monitor(stop, m, reg, vds, ema, loss_spec)
    if not (feature_cache == "auto" or feature_cache is True or feature_cache is False):
        raise DataError(f"Expected feature_cache 'auto', True or False; received {feature_cache!r}.")
    if plan is not None:
        parallel.check_batches(ds.batch_sizes(), plan.world, bn_sync)
    names = api._param_names(m)
    groups = optim.param_groups(names, lr, group_lrs)
    steps = len(ds)
    total_steps = epochs * steps
    factor = optim.make_schedule(schedule, steps)
    frozen_at = _unfreeze_plan(m, unfreeze, epochs)
    ckpt = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME)
    saved = None
    if resume and ckpt and os.path.exists(ckpt):
        saved = _read_checkpoint(m, ckpt, cfg, seed, stop, ema, loss_spec)
    start = 0 if saved is None else saved["epoch"] + 1
    used = [n for n in names if n != multitask.LOG_VARS or loss_spec.uncertainty]
    _check_trainable(m, used, frozen_at, None if saved is None else saved["frozen"], start, epochs)
    if m.backbone_name == gate.NAME:
        gate.check_members_stay_frozen(m, (
            (e, [n for n in names if n not in fr]) for e, fr in
            _frozen_per_epoch(m, frozen_at, None if saved is None else saved["frozen"], start,
                              epochs)))
    if feature_cache is True:
        _check_feature_cache(m, names, ds, frozen_at,
                             None if saved is None else saved["frozen"], start, epochs)
    anchors = None
    if reg is not None:
        w = api.get_weights(m)
        anchors = {n: w[n] for n in names if n.startswith("backbone.")}

    history = History()
    if plan is not None:
        be.init_parallel(plan, m)
    writer = plan is None or plan.rank == 0         # rank 0 alone writes checkpoints
    trainer = be.make_trainer(m, cfg, groups, None if reg is None else (reg.alpha, reg.beta),
                              anchors, loss_spec, precision=precision, parallel=plan)
    best = {"value": math.nan, "weights": None, "epoch": -1}
    stopped = False
    if saved is not None:
        history, anchors = _apply_checkpoint(m, be, trainer, saved, reg, anchors)
        if stop is not None:
            best, stopped = saved["best"], saved["stopped"]
    good = api.get_weights(m), set(m.frozen)
    ema_w = None
    if ema is not None:
        ema_w = saved["ema"] if saved is not None else {k: v.copy() for k, v in good[0].items()}
        history.ema_weights = ema_w
    good_epoch = start - 1              # the epoch whose end `good` holds (-1: before training)
    ckpt_epoch = start - 1 if saved is not None else None   # the epoch the file on disk holds
    cache = None
    callbacks = list(callbacks or [])

    for epoch in range(start, epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        if frozen_at is not None:
            m.frozen = set(frozen_at[epoch])
            be.apply_freeze(m)
        be.seed_epoch(m, int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        backbone_frozen = all(n in m.frozen for n in names if n.startswith("backbone."))
        use_cache = feature_cache is True or (feature_cache == "auto" and backbone_frozen
                                              and ds.augment is None)
        if not use_cache:
            cache = None                # computed again if the backbone is frozen again later
        elif cache is None:
            cache = _feature_cache(m, ds)
        bar = _Progress(progress and writer, steps, f"epoch {epoch + 1}/{epochs}")
        step_losses, step_parts = [], []
        try:                            # the backend may leave train mode on between steps
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
                    where = ("its weights from before training" if good_epoch < 0
                             else f"the end of epoch {good_epoch}")
                    if ckpt_epoch is not None and ckpt_epoch == good_epoch:
                        where += f", as saved in the checkpoint {ckpt}, which is left as it was"
                    raise TrainingDivergedError(
                        f"Training diverged: the loss is {loss} at epoch {epoch}, step {step} "
                        f"(lr {lrs[-1]:.3g}; epochs and steps count from 0, as in the history). "
                        f"Expected a finite loss; the model was restored to {where}. "
                        "Lower the learning rate, add warm-up, or check the data.", epoch, step)
                if ema_w is not None:
                    optim.ema_update(ema_w, api.get_weights(m), ema)
                step_losses.append(loss)
                if trainer.last_parts is not None:
                    step_parts.append(trainer.last_parts)
                bar.update(loss)
                for cb in callbacks:
                    cb("step", {"epoch": epoch, "step": step, "loss": loss, "lr": lrs})
        finally:
            trainer.end_epoch()
        record = {"epoch": epoch, "loss": float(np.mean(step_losses)), "lr": lrs[-1],
                  "trainable": len(names) - len(m.frozen), "cached": bool(use_cache)}
        if reg is not None:
            record["penalty"] = penalty
        if step_parts:             # a step without a task's labels reports NaN for it
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(np.asarray(step_parts), axis=0)
            record.update({f"loss_{t[0]}": float(v) for t, v in zip(loss_spec.tasks, means)})
            if loss_spec.uncertainty:
                s = api.get_weights(m)[multitask.LOG_VARS]
                record.update({f"log_var_{t[0]}": float(v) for t, v in zip(loss_spec.tasks, s)})
        if vds is not None:
            record.update({f"val_{k}": v for k, v in
                           _evaluate(m, vds, vds.batch_size, loss_spec).items()})
            if ema_w is not None:
                current = api.get_weights(m)
                api.set_weights(m, ema_w)
                try:
                    record.update({f"val_{k}_ema": v for k, v in
                                   _evaluate(m, vds, vds.batch_size, loss_spec).items()})
                finally:
                    api.set_weights(m, current)
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        bar.close(**{k: v for k, v in record.items() if k in ("loss", "val_loss", "val_accuracy")})
        good, good_epoch = (api.get_weights(m), set(m.frozen)), epoch
        if stop is not None:
            value = record[stop.monitor]
            if stop.better(value, best["value"]):
                best = {"value": value, "weights": good if stop.restore_best else None,
                        "epoch": epoch}
            elif epoch - best["epoch"] >= stop.patience:
                stopped = True
        if ckpt:
            if writer:
                _save(m, trainer, ckpt, epoch, history, anchors, cfg, seed, stop, best, stopped,
                      ema, ema_w, loss_spec)
            ckpt_epoch = epoch
        for cb in callbacks:
            cb("epoch", record)
    trainer.close()
    if stop is not None and stop.restore_best and best["weights"] is not None:
        api.set_weights(m, best["weights"][0])
        m.frozen = set(best["weights"][1])
        be.apply_freeze(m)
        history.best_epoch = best["epoch"]
    if ema_w is not None and ema_swap:
        api.set_weights(m, ema_w)
    if isinstance(train, (tuple, list)) and len(train) == 2:
        trained_on = set(m.report.get("trained_on", []))   # tl.fuse(..., "stack") refuses to
        m.report["trained_on"] = sorted(trained_on | {fingerprint(train[0])})  # fit on these
    return history


def _parallel_plan(m, distributed, replicas, bn_sync):
    """Data-parallel or not, from the launch (torchrun's WORLD_SIZE) and the arguments."""
    if distributed not in (None, True, False):
        raise DataError(f"Expected distributed as None (detect torchrun), True or False; "
                        f"received {distributed!r}.")
    if replicas is not None:
        if m.backend != "keras":
            raise DataError(f"Expected replicas= with a Keras model (tf.distribute); received a "
                            f"{m.backend} model. Launch torch runs with torchrun "
                            f"--nproc_per_node=N instead.")
        return registry.load("keras").replica_plan(replicas, bn_sync)
    env = parallel.torch_env() if distributed is not False else None
    if env is None:
        if distributed:
            raise DistributedError(
                "Expected a torchrun launch for distributed=True (WORLD_SIZE, RANK, MASTER_ADDR "
                "set); received none. Launch with: torchrun --nproc_per_node=N your_script.py, "
                "or pass replicas=N with a Keras model.")
        return None
    if m.backend != "torch":
        if distributed:
            raise DistributedError(f"Expected a torch model under torchrun; received a "
                                   f"{m.backend} model. Keras trains data-parallel in one "
                                   f"process: fine_tune(..., replicas=N).")
        return None
    return parallel.Plan(env[0], env[1], bn_sync)


def fingerprint(x) -> str:
    """A cheap identity for an image array: shape, dtype and up to 256 evenly spaced images
    (hashing every byte of a large set would cost seconds)."""
    import hashlib
    x = np.asarray(x)
    h = hashlib.sha1(f"{x.shape}{x.dtype}".encode())
    idx = np.unique(np.linspace(0, len(x) - 1, num=min(len(x), 256)).astype(int)) if len(x) else []
    for i in idx:
        h.update(np.ascontiguousarray(x[i]).tobytes())
    return h.hexdigest()


def _check_ema(ema, ema_swap, stop):
    if ema is None:
        return None
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 < float(ema) < 1.0:
        raise DataError(f"Expected ema as a decay in (0, 1), e.g. 0.999, or None; received "
                        f"{ema!r}.")
    if ema_swap and stop is not None and stop.restore_best:
        raise DataError("Expected one source for the final weights; received ema with "
                        "ema_swap=True and early_stopping with restore_best=True. Pass "
                        "ema_swap=False (keep the best epoch; the EMA stays in "
                        "history.ema_weights), or EarlyStopping(restore_best=False).")
    return float(ema)


def _check_monitor(stop: EarlyStopping, m: TransferModel, reg, vds, ema=None,
                   loss: losses.Loss | None = None) -> None:
    """The monitored metric must be one the history will have: checked before training."""
    available = ["loss"] + (["penalty"] if reg is not None else [])
    multi = isinstance(loss, multitask.MultiLoss)
    if multi:
        available += multitask.history_names(loss)
    names = (multitask.score_names(loss) if multi
             else losses.score_names(m.num_outputs, (loss or losses.Loss()).name))
    if vds is not None:
        available += [f"val_{k}" for k in names]
        if ema is not None:
            available += [f"val_{k}_ema" for k in names]
    if stop.monitor in available:
        return
    hint = ""
    if stop.monitor.startswith("val_") and vds is None:
        hint = " Pass val=(x_val, y_val) to monitor validation metrics."
    else:
        close = difflib.get_close_matches(stop.monitor, available, n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise DataError(f"Expected early_stopping monitor as one of {available}; received "
                    f"{stop.monitor!r}.{hint}")


def _frozen_per_epoch(m, frozen_at, saved_frozen, start, epochs):
    for e in range(start, epochs):
        if frozen_at is not None:
            yield e, frozen_at[e]
        else:
            yield e, m.frozen if saved_frozen is None else saved_frozen


def _check_trainable(m, names, frozen_at, saved_frozen, start, epochs) -> None:
    """Every epoch must train something (torch would fail in backward, Keras train nothing)."""
    for e, frozen in _frozen_per_epoch(m, frozen_at, saved_frozen, start, epochs):
        if all(n in frozen for n in names):
            how = ("the unfreeze plan opens nothing by then" if frozen_at is not None
                   else "the model is frozen entirely")
            raise FreezeSpecError(
                f"Expected at least one trainable parameter in every epoch; received all "
                f"{len(names)} parameters frozen in epoch {e} ({how}). Unfreeze some first, e.g. "
                f"tl.unfreeze(m, 'head'), or pass unfreeze={{0: 'head', ...}}.")


def _check_feature_cache(m, names, ds, frozen_at, saved_frozen, start, epochs) -> None:
    """feature_cache=True trains the head on features computed once, un-augmented, from a
    frozen backbone: anything else would silently train on other data."""
    if ds.augment is not None:
        raise DataError(f"Expected no augmentation with feature_cache=True (features are computed "
                        f"once, from un-augmented images); received train data with "
                        f"augment={ds.augment!r}. Pass feature_cache='auto' (caches only without "
                        f"augmentation) or False, or drop the augmentation.")
    for e, frozen in _frozen_per_epoch(m, frozen_at, saved_frozen, start, epochs):
        open_ = [n for n in names if n.startswith("backbone.") and n not in frozen]
        if open_:
            raise DataError(
                f"Expected the whole backbone frozen in every epoch with feature_cache=True; "
                f"received {len(open_)} trainable backbone parameter(s) in epoch {e} (e.g. "
                f"{open_[0]!r}). Freeze it with tl.freeze(m, 'backbone'), or pass "
                f"feature_cache='auto' (caches only the epochs with a frozen backbone).")


def _feature_cache(m: TransferModel, ds: tldata.Dataset):
    """Backbone features of every sample, computed one batch at a time and stored by sample
    index; `valid` marks the samples whose image decoded (on_error="skip" leaves some out)."""
    feats, valid = None, np.zeros(ds.num_samples, bool)
    for idx, xb, _ in ds.indexed_batches():
        f = api.features(m, xb, batch_size=ds.batch_size)
        if feats is None:
            feats = np.zeros((ds.num_samples, *f.shape[1:]), f.dtype)
        feats[idx] = f
        valid[idx] = True
    if feats is None:
        raise DataError(f"Expected at least one readable image; received none of "
                        f"{ds.num_samples} (see ds.skipped).")
    return feats, valid


def _batches(ds: tldata.Dataset, epoch: int, cache):
    """The epoch's batches; from the cache, the same samples in the same order as ds.epoch
    (images that failed to decode are left out of their batch, empty batches skipped)."""
    if cache is None:
        yield from ds.epoch(epoch)
        return
    feats, valid = cache
    order, _ = ds.plan(epoch)
    b = ds.batch_size
    for k in range(len(ds)):
        idx = order[k * b:(k + 1) * b]
        idx = idx[valid[idx]]
        if len(idx):
            yield feats[idx], ds.labels[idx]


def _stop_config(stop) -> dict | None:
    return None if stop is None else {"monitor": stop.monitor, "patience": int(stop.patience),
                                      "mode": stop.mode, "min_delta": float(stop.min_delta),
                                      "restore_best": bool(stop.restore_best)}


def _save(m, trainer, path, epoch, history, anchors, cfg, seed, stop=None, best=None,
          stopped=False, ema=None, ema_w=None, loss=None):
    tensors = {f"model/{k}": v for k, v in api.get_weights(m).items()}
    tensors.update({f"optim/{k}": v for k, v in trainer.state_dict().items()})
    if anchors:
        tensors.update({f"anchor/{k}": v for k, v in anchors.items()})
    meta = {"format": CHECKPOINT_FORMAT, "backend": m.backend, "spec": m.spec.to_json(),
            "frozen": json.dumps(sorted(m.frozen)), "epoch": str(epoch),
            "history": history.to_json(), "optimizer": json.dumps(asdict(cfg)),
            "seed": str(seed), "early_stopping": json.dumps(_stop_config(stop)),
            "ema": json.dumps(ema), "loss": json.dumps(asdict(loss or losses.Loss()))}
    if ema_w is not None:
        tensors.update({f"ema/{k}": v for k, v in ema_w.items()})
    if stop is not None:
        state = {"best_value": best["value"], "best_epoch": best["epoch"], "stopped": stopped}
        if best["weights"] is not None:
            tensors.update({f"best/{k}": v for k, v in best["weights"][0].items()})
            state["best_frozen"] = sorted(best["weights"][1])
        meta["early_stopping_state"] = json.dumps(state)
    wio.save_file(path, tensors, meta)


def _read_checkpoint(m, path, cfg, seed, stop, ema=None, loss=None) -> dict:
    """Read and check a checkpoint before anything is changed: the same backbone, optimizer,
    seed and early stopping as this call (else the resumed run could not be the run it
    continues). The backend may differ: checkpoints are portable."""
    tensors, meta = wio.load_file(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"Expected a fine_tune checkpoint ({CHECKPOINT_FORMAT}) in {path!r}; "
                              f"received format {meta.get('format')!r}.")
    spec = json.loads(meta["spec"])
    if spec["backbone"] != m.backbone_name:
        raise CheckpointError(f"The checkpoint {path!r} is of backbone {spec['backbone']!r}; this "
                              f"model is {m.backbone_name!r}. Use another checkpoint_dir.")
    fresh = "or start afresh with resume=False or another checkpoint_dir"
    stored = json.loads(meta["optimizer"]) if "optimizer" in meta else None
    asked = json.loads(json.dumps(asdict(cfg)))
    if stored != asked:
        diff = ", ".join(f"{k} {stored.get(k)!r} -> {asked.get(k)!r}" for k in asked
                         if stored is None or stored.get(k) != asked.get(k))
        raise CheckpointError(
            f"Expected the optimizer the checkpoint {path!r} was trained with ({stored}); received "
            f"{asked} ({diff}). Its optimizer state belongs to that optimizer: resume with the "
            f"same settings, {fresh}.")
    if "seed" in meta and int(meta["seed"]) != int(seed):
        raise CheckpointError(
            f"Expected seed={meta['seed']} (the seed the checkpoint {path!r} was trained with); "
            f"received seed={seed}. The remaining epochs would shuffle differently from the run "
            f"being resumed: pass seed={meta['seed']}, {fresh}.")
    stored_stop = json.loads(meta.get("early_stopping", "null"))
    if stored_stop != _stop_config(stop):
        raise CheckpointError(
            f"Expected the early_stopping the checkpoint {path!r} was trained with "
            f"({stored_stop}); received {_stop_config(stop)}. Resume with the same early_stopping, "
            f"{fresh}.")
    stored_ema = json.loads(meta.get("ema", "null"))
    if stored_ema != ema:
        raise CheckpointError(
            f"Expected the ema the checkpoint {path!r} was trained with ({stored_ema}); received "
            f"{ema}. The moving average continues that run's: resume with ema={stored_ema}, "
            f"{fresh}.")
    stored_loss = json.loads(meta.get("loss", json.dumps(asdict(losses.Loss()))))
    asked_loss = json.loads(json.dumps(asdict(loss or losses.Loss())))
    if stored_loss != asked_loss:
        raise CheckpointError(
            f"Expected the loss the checkpoint {path!r} was trained with ({stored_loss}); "
            f"received {asked_loss}. Resume with the same loss, {fresh}.")
    out = {"tensors": tensors, "meta": meta, "epoch": int(meta["epoch"]),
           "ema": {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")} or None,
           "frozen": set(json.loads(meta["frozen"])),
           "best": {"value": math.nan, "weights": None, "epoch": -1}, "stopped": False}
    if stop is not None and "early_stopping_state" in meta:
        state = json.loads(meta["early_stopping_state"])
        weights = None
        if "best_frozen" in state:
            weights = ({k[5:]: v for k, v in tensors.items() if k.startswith("best/")},
                       set(state["best_frozen"]))
        out["best"] = {"value": float(state["best_value"]), "weights": weights,
                       "epoch": int(state["best_epoch"])}
        out["stopped"] = bool(state["stopped"])
    return out


def _apply_checkpoint(m, be, trainer, saved, reg, anchors):
    tensors, meta = saved["tensors"], saved["meta"]
    api.set_weights(m, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    m.frozen = set(saved["frozen"])
    be.apply_freeze(m)
    trainer.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("optim/")})
    saved_anchors = {k[7:]: v for k, v in tensors.items() if k.startswith("anchor/")}
    if reg is not None and saved_anchors:
        anchors = saved_anchors
        trainer.set_anchors(anchors)
    history = History.from_json(meta["history"])
    if saved["best"]["epoch"] >= 0:
        history.best_epoch = saved["best"]["epoch"]
    return history, anchors

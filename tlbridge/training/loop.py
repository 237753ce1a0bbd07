"""The epoch loop: the epoch's freeze state, random streams and feature cache, then one
optimizer step per batch with the scheduled learning rates; a non-finite loss restores the
last good weights and stops the run."""
from __future__ import annotations

import math
import time

import numpy as np

from .. import api, inputs, optim
from ..errors import TrainingDivergedError
from .feed import batches, feature_cache
from .progress import Progress
from .state import Run


def _start_epoch(run: Run, epoch: int) -> bool:
    """Freeze state, random streams and the feature cache for `epoch`; True to train the
    head on cached features."""
    m, plan = run.m, run.plan
    if plan.frozen_at is not None:
        m.frozen = set(plan.frozen_at[epoch])
        run.be.apply_freeze(m)
    run.be.seed_epoch(m, int(np.random.SeedSequence([run.seed, epoch]).generate_state(1)[0]))
    backbone_frozen = all(n in m.frozen for n in plan.names if n.startswith("backbone."))
    use_cache = run.feature_cache is True or (run.feature_cache == "auto" and backbone_frozen
                                              and run.ds.augment is None)
    if not use_cache:
        run.cache = None                # computed again if the backbone is frozen again later
    elif run.cache is None:
        run.cache = feature_cache(m, run.ds)
    return use_cache


def _diverged(run: Run, bar, loss, epoch: int, step: int, lrs) -> TrainingDivergedError:
    """Restore the last good weights and say where the run stopped."""
    bar.close()
    run.good.restore()
    where = ("its weights from before training" if run.good_epoch < 0
             else f"the end of epoch {run.good_epoch}")
    if run.ckpt_epoch is not None and run.ckpt_epoch == run.good_epoch:
        where += f", as saved in the checkpoint {run.checkpoint.path}, which is left as it was"
    return TrainingDivergedError(
        f"Training diverged: the loss is {loss} at epoch {epoch}, step {step} "
        f"(lr {lrs[-1]:.3g}; epochs and steps count from 0, as in the history). "
        f"Expected a finite loss; the model was restored to {where}. "
        "Lower the learning rate, add warm-up, or check the data.", epoch, step)


def _steps(run: Run, epoch: int, use_cache: bool, bar):
    """One optimizer step per batch; yields (loss, penalty, lrs) of each."""
    m, trainer = run.m, run.trainer
    fn = trainer.head_step if use_cache else trainer.step
    for step, (xb, yb) in enumerate(batches(run.ds, epoch, run.cache if use_cache else None)):
        lrs = run.plan.lrs(epoch, step)
        loss, penalty = fn(inputs.cast(xb, m.dtype), yb.astype(m.dtype, copy=False), lrs)
        if not (math.isfinite(loss) and math.isfinite(penalty)):
            raise _diverged(run, bar, loss, epoch, step, lrs)
        if run.ema_w is not None:
            optim.ema_update(run.ema_w, api.get_weights(m), run.ema.decay)
        bar.update(loss)
        if run.callbacks:
            info = {"epoch": epoch, "step": step, "loss": loss, "lr": lrs,
                    "cached": use_cache, "rows": trainer.last_rows}
            if run.precision == "fp16":
                info["loss_scale"] = trainer.loss_scale     # after this step's update
            for cb in run.callbacks:
                cb("step", info)
        yield loss, penalty, lrs


def train_epoch(run: Run, epoch: int):
    """(the epoch's record so far, its progress bar): mean training loss, last lr, penalty,
    per-loss extras (multi-task: per-task losses)."""
    t0 = time.perf_counter()
    use_cache = _start_epoch(run, epoch)
    bar = Progress(run.progress and run.writer, run.plan.steps,
                   f"epoch {epoch + 1}/{run.plan.epochs}")
    step_losses, parts, penalty, lrs = [], [], 0.0, None
    try:                                # the backend may leave train mode on between steps
        for loss, penalty, lrs in _steps(run, epoch, use_cache, bar):
            step_losses.append(loss)
            if run.trainer.last_parts is not None:
                parts.append(run.trainer.last_parts)
    finally:
        run.trainer.end_epoch()
    m = run.m
    record = {"epoch": epoch, "loss": float(np.mean(step_losses)), "lr": lrs[-1],
              "trainable": len(run.plan.names) - len(m.frozen), "cached": bool(use_cache)}
    if run.opt.regularizer is not None:
        record["penalty"] = penalty
    record.update(run.loss.epoch_record(parts, api.get_weights(m) if run.loss.needs_weights
                                        else None))
    record["_t0"] = t0
    return record, bar

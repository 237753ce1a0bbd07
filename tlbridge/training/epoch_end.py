"""The end of an epoch (validation metrics, the EMA's metrics, early stopping, the
checkpoint, callbacks) and of the run (best or averaged weights, what it was trained on)."""
from __future__ import annotations

import time

import numpy as np

from .. import api, inputs
from . import checkpoint
from .evaluation import evaluate_dataset
from .snapshot import Snapshot
from .state import Run


def _validate(run: Run, record: dict) -> None:
    vds, m = run.vds, run.m
    record.update({f"val_{k}": v for k, v in
                   evaluate_dataset(m, vds, vds.batch_size, run.loss).items()})
    if run.ema_w is None:
        return
    current = api.get_weights(m)
    api.set_weights(m, run.ema_w)
    try:
        record.update({f"val_{k}_ema": v for k, v in
                       evaluate_dataset(m, vds, vds.batch_size, run.loss).items()})
    finally:
        api.set_weights(m, current)


def _early_stopping(run: Run, record: dict, epoch: int) -> None:
    stop = run.stop
    value = record[stop.monitor]
    if stop.better(value, run.best["value"]):
        run.best = {"value": value, "weights": run.good if stop.restore_best else None,
                    "epoch": epoch}
    elif epoch - run.best["epoch"] >= stop.patience:
        run.stopped = True


def end_epoch(run: Run, epoch: int, record: dict, bar) -> None:
    if run.vds is not None:
        _validate(run, record)
    record["seconds"] = time.perf_counter() - record.pop("_t0")
    run.history.append(record)
    bar.close(**{k: v for k, v in record.items() if k in ("loss", "val_loss", "val_accuracy")})
    if epoch < run.plan.epochs - 1 or (run.stop is not None and run.stop.restore_best):
        # the restore point for a later epoch's divergence, or early stopping's best weights;
        # after the last epoch nothing can use it (a copy of every weight, 4% of an epoch)
        run.good, run.good_epoch = Snapshot.take(run.m, run.be), epoch
    if run.stop is not None:
        _early_stopping(run, record, epoch)
    if run.checkpoint is not None:
        if run.writer:
            checkpoint.save(run, epoch)
        run.ckpt_epoch = epoch
    for cb in run.callbacks:
        cb("epoch", record)


def finish(run: Run, train):
    """The final weights (the best epoch's, or the average's), and the training rows' content
    hashes (tl.fuse refuses to fit a stacker or a gate on them)."""
    run.trainer.close()
    m, stop = run.m, run.stop
    if stop is not None and stop.restore_best and run.best["weights"] is not None:
        run.best["weights"].restore()
        run.history.best_epoch = run.best["epoch"]
    if run.ema_w is not None and run.ema.swap:
        api.set_weights(m, run.ema_w)
    x = train[0] if isinstance(train, (tuple, list)) and len(train) == 2 else (
        train.in_memory_inputs() if hasattr(train, "in_memory_inputs") else None)
    if x is not None:
        rows = m.report.get("trained_rows", np.zeros(0, np.uint64))
        m.report["trained_rows"] = np.union1d(rows, inputs.row_hashes(x)).astype(np.uint64)
    return run.history

"""The values fine_tune takes beside the optimizer: early stopping, checkpointing and the
data-parallel launch, each checked when it is made (before any work)."""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass

import numpy as np

from .. import parallel as tlparallel
from ..errors import DataError

CHECKPOINT_NAME = "last.safetensors"


@dataclass(frozen=True)
class EarlyStopping:
    monitor: str = "val_loss"
    patience: int = 3
    mode: str = "auto"          # "min" | "max" | "auto" (max for accuracy/auc/top1/top5, else min)
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
            mode = "max" if key.endswith(("accuracy", "auc", "top1", "top5")) else "min"
        if math.isnan(new):
            return False
        if math.isnan(best):
            return True
        return new > best + self.min_delta if mode == "max" else new < best - self.min_delta

    def config(self) -> dict:
        """JSON-ready: what a checkpoint records and a resume must match."""
        return {"monitor": self.monitor, "patience": int(self.patience), "mode": self.mode,
                "min_delta": float(self.min_delta), "restore_best": bool(self.restore_best)}


def early_stopping(spec) -> EarlyStopping | None:
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


def check_monitor(stop: EarlyStopping, available: list[str], has_val: bool) -> None:
    """The monitored metric must be one the history will have: checked before training."""
    if stop.monitor in available:
        return
    hint = ""
    if stop.monitor.startswith("val_") and not has_val:
        hint = " Pass val=(x_val, y_val) to monitor validation metrics."
    else:
        close = difflib.get_close_matches(stop.monitor, available, n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise DataError(f"Expected early_stopping monitor as one of {available}; received "
                    f"{stop.monitor!r}.{hint}")


@dataclass(frozen=True)
class Checkpoint:
    """Write `directory`/last.safetensors after every epoch (rank 0 only); resume=True
    continues after its last complete epoch, on either backend, and refuses a call that
    would continue another run (another optimizer, seed, loss, early stopping or model)."""

    directory: object
    resume: bool = False

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)):
            raise DataError(f"Expected checkpoint as a directory (str or os.PathLike) or "
                            f"tl.Checkpoint(directory, resume=True); received "
                            f"{type(self.directory).__name__} {self.directory!r}.")
        object.__setattr__(self, "resume", bool(self.resume))

    @property
    def path(self) -> str:
        return os.path.join(os.fspath(self.directory), CHECKPOINT_NAME)


def checkpoint(spec) -> Checkpoint | None:
    if spec is None or isinstance(spec, Checkpoint):
        return spec
    return Checkpoint(spec)


@dataclass(frozen=True)
class Parallel:
    """Data-parallel fine-tuning (tlbridge/parallel.py). replicas: Keras replicas in one
    process (an int, or a tf.distribute.MirroredStrategy); distributed: None detects a
    torchrun launch (WORLD_SIZE > 1), True insists on one, False ignores it; bn_sync:
    "global" (BatchNorm statistics of the whole global batch: the one-process result) or
    "local" (each share's own, the frameworks' default)."""

    replicas: object = None
    bn_sync: str = "global"
    distributed: bool | None = None

    def __post_init__(self):
        tlparallel.check_bn_sync(self.bn_sync)
        if self.distributed not in (None, True, False):
            raise DataError(f"Expected distributed as None (detect torchrun), True or False; "
                            f"received {self.distributed!r}.")


def parallel(spec) -> Parallel:
    if spec is None:
        return Parallel()
    if isinstance(spec, Parallel):
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return Parallel(replicas=int(spec))
    raise DataError(f"Expected parallel as None (torchrun is detected), a number of Keras "
                    f"replicas, or tl.Parallel(replicas=..., bn_sync=..., distributed=...); "
                    f"received {type(spec).__name__} {spec!r}.")


def check_compile(spec, dp) -> bool:
    """compile=True: compiled steps on one device. Data-parallel steps (DDP, MirroredStrategy)
    are not compiled: refused before any work rather than silently run eagerly."""
    if not isinstance(spec, (bool, np.bool_)):
        raise DataError(f"Expected compile as True or False; received {type(spec).__name__} "
                        f"{spec!r}.")
    if spec and dp is not None:
        how = f"{dp.world} Keras replicas" if dp.strategy is not None else \
            f"torchrun, {dp.world} ranks"
        raise DataError(f"Expected compile=True with training on one device; received a "
                        f"data-parallel run ({how}), whose steps tlbridge does not compile. "
                        f"Pass compile=False for data-parallel training, or train on one "
                        f"device with compile=True.")
    return bool(spec)

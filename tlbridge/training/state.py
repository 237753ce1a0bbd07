"""One run's state, shared by the trainer's parts (the loop, the epoch end, checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..history import History


@dataclass
class Run:
    m: object                   # the TransferModel being trained
    be: object                  # its backend module
    loss: object                # losses.Loss / multitask.MultiLoss
    opt: object                 # the optimizer value (tlbridge/optim.py)
    plan: object                # training.plan.Plan
    ds: object
    vds: object
    seed: int
    stop: object = None         # EarlyStopping or None
    checkpoint: object = None   # options.Checkpoint or None
    parallel: object = None     # tlbridge.parallel.Plan or None
    precision: str = "fp32"
    feature_cache: object = "auto"
    progress: bool = True
    callbacks: list = field(default_factory=list)
    compile: bool = False       # compiled steps (torch.compile / XLA)
    trainer: object = None
    anchors: dict | None = None
    history: History = field(default_factory=History)
    best: dict = field(default_factory=lambda: {"value": math.nan, "weights": None, "epoch": -1})
    stopped: bool = False
    ema_w: dict | None = None   # the moving average of the weights
    good: object = None         # a Snapshot of the end of the last good epoch
    good_epoch: int = -1        # the epoch whose end `good` holds (-1: before training)
    ckpt_epoch: int | None = None   # the epoch the checkpoint on disk holds
    start: int = 0
    cache: tuple | None = None
    identity: dict | None = None    # what the checkpoint records a run was trained with

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes checkpoints and shows progress."""
        return self.parallel is None or self.parallel.rank == 0

    @property
    def ema(self):
        return self.opt.ema

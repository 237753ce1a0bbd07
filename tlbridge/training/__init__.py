"""fine_tune: one training loop, written once in numpy terms, driving either backend.

Both backends see the same batches (tl.data, seeded per epoch), the same learning rate at
every step (schedules are computed here), the same freeze state per epoch (gradual
unfreezing is resolved here) and follow the same optimizer formulas (tlbridge/optim.py).

The loop is built from parts with one job each: setup.py (every check, the plan, the trainer,
the checkpoint to resume), loop.py (an epoch of steps), epoch_end.py (metrics, EMA, early
stopping, checkpoint), checkpoint.py, inputs.py (data and the feature cache). Model kinds
(task heads, a gated fusion) speak to it through their loss value and tlbridge/kinds.py; it
imports none of them.
"""
from __future__ import annotations

from ..history import History
from ..optim import L2SP
from . import epoch_end, loop, setup
from .checkpoint import CHECKPOINT_FORMAT
from .evaluation import evaluate
from .options import CHECKPOINT_NAME, Checkpoint, EarlyStopping, Parallel

__all__ = ["fine_tune", "compile", "evaluate", "EarlyStopping", "Checkpoint", "Parallel", "L2SP",
           "CHECKPOINT_NAME", "CHECKPOINT_FORMAT"]


def compile(model, enabled: bool = True):
    """Every later fine_tune of `model` runs compiled steps (torch.compile; XLA on
    Keras-on-TensorFlow; Keras on JAX is jitted already), the same results within float32
    noise: a property of the model, as torch.compile(module) and Keras' compile(jit_compile=)
    make it, so a recipe's fine_tune call reads the same either way. Returns `model`."""
    m = setup.model_to_train(model)
    m.state["compile"] = options.check_compile(enabled, None)
    return model


def fine_tune(model, train, *, val=None, epochs: int = 1, batch_size: int = 32, optimizer="sgd",
              unfreeze: dict | None = None, loss=None, early_stopping=None, checkpoint=None,
              seed: int = 0, progress: bool = True, callbacks: list | None = None,
              feature_cache="auto", precision: str | None = None, parallel=None) -> History:
    """Fine-tune `model` in place on `train` ((x, y) arrays or a tl.data dataset); the same
    call gives the same result on both backends.

    optimizer: "sgd" (tl.optim.SGD(): lr 1e-3, momentum 0.9), "adam", "adamw", or a value
    (tl.optim.SGD/Adam/AdamW) carrying lr, parameter groups, schedule, L2-SP and EMA.
    unfreeze: {epoch: spec} (keys ints or int-like strings). loss: the head's unless given (a
    name, tl.losses.Loss, or tl.losses.TaskWeights for task heads). early_stopping: a patience,
    a dict or tl.EarlyStopping. checkpoint: a directory, or tl.Checkpoint(dir, resume=True) to
    continue after its last complete epoch on either backend (a call with another optimizer,
    seed, loss, EMA or early stopping is refused). callbacks: cb(event, info) for "step" and
    "epoch". feature_cache: "auto" (head steps on cached backbone features in epochs with a
    frozen backbone and no augmentation), True (insist), False. precision: "fp32" (the model's
    dtype), "bf16", "fp16". parallel: tl.Parallel(replicas=, bn_sync=, distributed=) or a
    number of Keras replicas; torchrun is detected. Compiled steps: tl.compile(model) first.
    A gated FusedModel trains its gate.
    Everything checkable is checked before the first step. docs/fine-tuning.md has it all.
    """
    m = setup.model_to_train(model)
    run = setup.prepare(m, train, val=val, epochs=epochs, batch_size=batch_size,
                        optimizer=optimizer, unfreeze=unfreeze, loss=loss,
                        early_stopping=early_stopping, checkpoint=checkpoint, seed=seed,
                        progress=progress, callbacks=callbacks, feature_cache=feature_cache,
                        precision=precision, parallel=parallel)
    try:
        setup.start(run)
        for epoch in range(run.start, epochs):
            if run.stopped:
                break
            record, bar = loop.train_epoch(run, epoch)
            epoch_end.end_epoch(run, epoch, record, bar)
    except BaseException:           # a diverged or interrupted run: the model's layout back
        if run.trainer is not None:
            run.trainer.close()
        raise
    return epoch_end.finish(run, train)

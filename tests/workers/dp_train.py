"""Data-parallel fine-tuning runs for tests/test_distributed.py (and a usage example).

    torchrun --nproc_per_node=2 tests/workers/dp_train.py torch OUT RUN [RUN ...]
    python tests/workers/dp_train.py keras OUT RUN [RUN ...] --replicas 2

A RUN is "optimizer:bn_sync[:option...]" (options: unfreeze, freeze_bn_biases, cache: the
feature cache in epochs with a frozen backbone; multi: two task heads, a BCE and an MSE task
with missing labels, uncertainty weighting; bf16: a float32 model in mixed precision; f32: the same
float32 model without it; lora: rank-2 LoRA adapters on every conv, so only they and the head train; tokens:
the two-input text model token_bag on token ids + attention masks instead of images). Each run trains
seed_vgg with BatchNorm (fp64) on 37 images in batches of 10 (the last one is short, and its
two shares differ in size) for 2 epochs and writes the final canonical weights to
OUT.<i>.safetensors (rank 0; rank r > 0: OUT.<i>.rank<r>.safetensors), with the epoch losses,
the first step's loss and every step's row counts per replica in its metadata. Under torchrun every rank runs this; with --replicas N, Keras
runs N replicas on logical CPU devices (cpu_replicas before TensorFlow starts).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 16, 16, 3))
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]
    return x, y


def tokens():
    """37 sequences of 9 token ids with padding of varying length (mask 0) and a label a small
    model can learn (is token 1 among the real tokens?)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 20, size=(37, 9))
    mask = (np.arange(9)[None, :] < rng.integers(2, 10, size=(37, 1))).astype(np.int64)
    y = ((ids == 1) & (mask == 1)).any(axis=1).astype(float)[:, None]
    return {"input_ids": ids, "attention_mask": mask}, y


def model(backend, multi=False, dtype="float64", text=False, lora=False, outputs=1):
    import tlbridge as tl
    if lora:
        return tl.add_lora(model(backend, multi, dtype, text), rank=2, alpha=4, seed=5)
    if text:
        m = tl.load_backbone("token_bag", backend=backend, input_shape=(9,), dtype=dtype, seed=3,
                             vocab_size=20, dim=8)
        return tl.replace_head(m, 1, hidden=(6,), seed=4)
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), dtype=dtype,
                         seed=3, batch_norm=True, widths=(4, 8, 8))
    if multi:
        return tl.replace_heads(m, {"sign": ("bce", 1), "green": ("mse", 1)}, seed=4)
    return tl.replace_head(m, outputs, seed=4)


def two_labels(x, y):
    """A second independent sigmoid (is the green channel bright?): BCE over K=2 entries per
    row, whose data-parallel mean must divide by N*K as one process does."""
    return np.concatenate([y, (x[:, :, :, 1].mean(axis=(1, 2)) > 0).astype(y.dtype)[:, None]], 1)


def multi_labels(x, y):
    """Both tasks' labels, some missing (NaN): task means must count the global batch's."""
    sign = y[:, 0].copy()
    sign[::5] = np.nan
    green = x[:, :, :, 1].mean(axis=(1, 2))
    green[1::4] = np.nan
    return {"sign": sign, "green": green}


def bn_preceded_biases(m):
    """Conv biases right before a BatchNorm: their true gradient is 0 (BN subtracts the mean),
    so Adam's update of them is rounding noise divided by eps (docs/parity.md); frozen in the
    Adam runs, as in any BN network built without such biases."""
    import tlbridge as tl
    names = set(tl.get_weights(m))
    return [n for n in names if n.endswith(".bias") and n.startswith("backbone.features.")
            and f"backbone.features.{int(n.split('.')[2]) + 1}.running_mean" in names]


def train(backend, run, replicas=None, epochs=2, ckpt=None, resume=False, callbacks=()):
    """One run; returns (model, history)."""
    import tlbridge as tl
    optimizer, bn_sync, *options = run.split(":")
    multi = "multi" in options
    text = "tokens" in options
    f32 = "bf16" in options or "f32" in options         # f32: the bf16 run's float32 twin
    k2 = "k2" in options
    m = model(backend, multi, "float32" if f32 else "float64", text, "lora" in options, 2 if k2 else 1)
    opt = tl.optim.SGD(0.05) if optimizer == "sgd" else tl.optim.Adam(0.01)
    kw = dict(epochs=epochs, batch_size=10, optimizer=opt, seed=7, progress=False,
              checkpoint=None if ckpt is None else tl.Checkpoint(ckpt, resume=resume),
              callbacks=[*callbacks, _first_step], feature_cache="auto" if "cache" in options else False)
    if "bf16" in options:
        kw["precision"] = "bf16"
    if "freeze_bn_biases" in options:
        tl.freeze(m, bn_preceded_biases(m))
    if "unfreeze" in options:
        tl.freeze(m, "backbone")
        kw["unfreeze"] = {0: "head", 1: "all"}
    kw["parallel"] = tl.Parallel(replicas=replicas or None, bn_sync=bn_sync)
    x, y = tokens() if text else data()
    if f32:
        x, y = x.astype(np.float32), y.astype(np.float32)
    if k2:
        y = two_labels(x, y)
    if multi:
        y = multi_labels(x, y)
        kw["loss"] = tl.losses.TaskWeights("uncertainty")
    _FIRST.clear()
    _ROWS.clear()
    h = tl.fine_tune(m, (x, y), **kw)
    h.first_step = _FIRST[0] if _FIRST else float("nan")   # step 0's loss (a resume has none)
    h.rows = list(_ROWS)
    return m, h


_FIRST: list = []
_ROWS: list = []        # (epoch, step, head step on cached features?, rows per replica)


def _first_step(event, info):
    if event == "step" and (info["epoch"], info["step"]) == (0, 0):
        _FIRST.append(info["loss"])
    if event == "step":
        _ROWS.append((info["epoch"], info["step"], info["cached"], list(info["rows"])))


def losses_of(history) -> list[float]:
    """The epoch losses, then each task's (multi-task runs)."""
    return history["loss"] + sum((history[k] for k in history.keys() if k.startswith("loss_")),
                                 [])


def first_step(history) -> float:
    return history.first_step


def rows_of(history) -> list:
    """Every step's (epoch, step, cached, [rows this process's replicas trained on])."""
    return history.rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("backend")
    p.add_argument("out")
    p.add_argument("runs", nargs="+")
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", default=None, help="EPOCH:STEP where rank 1 exits")
    args = p.parse_args()
    if args.replicas:
        from tlbridge.backends.keras import cpu_replicas      # before TensorFlow initialises
        cpu_replicas(args.replicas)
    import tlbridge as tl
    from tlbridge import weights as wio

    rank = int(os.environ.get("RANK", "0"))
    callbacks = []
    if args.die_at:
        die_epoch, die_step = (int(v) for v in args.die_at.split(":"))

        def die(event, info):
            if event == "step" and rank == 1 and (info["epoch"], info["step"]) == (die_epoch,
                                                                                  die_step):
                sys.stderr.write(f"rank 1 exits on purpose at epoch {die_epoch} step "
                                 f"{die_step}\n")
                sys.stderr.flush()
                os._exit(3)
        callbacks.append(die)
    for i, run in enumerate(args.runs):
        m, h = train(args.backend, run, args.replicas, ckpt=args.ckpt, resume=args.resume,
                     callbacks=callbacks)
        name = f"{args.out}.{i}.safetensors" if rank == 0 else f"{args.out}.{i}.rank{rank}.safetensors"
        wio.save_file(name, tl.get_weights(m), {"loss": repr(losses_of(h)),    # every rank's
                                                "first": repr(first_step(h)),
                                                "rows": repr(rows_of(h))})


if __name__ == "__main__":
    main()

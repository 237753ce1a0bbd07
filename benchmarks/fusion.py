"""Fusion on the demo's target task: members that differ, then every fusion method.

    .venv/bin/python benchmarks/fusion.py

Data: scikit-learn's digits (no download), as in `make demo`: the source task (digits 0-4)
pretrains seed_vgg on torch; the target task is digits 5-9, "is it 7 or more?", split into
train / val (fits fusion weights, picks greedy-soup ingredients) / test (reported, untouched
by any fitting). Members:
  A, B, C: the pretrained seed_vgg with one new head (seed 2), fine-tuned with three data
           orders — A on torch, B and C on Keras (one starting point, so they can be souped);
  D:       resnet18 from random init on torch (another backbone, no pretraining).
Methods: tl.fuse mean and weighted, in logit and probability space, and stack (a logistic
regression on the members' logits, fitted on the held-out val set, or on out-of-fold outputs
of 5-fold fine-tuning on train) and gate (a softmax gate per input over the members' logits or
their backbone features, trained on val by tl.fine_tune with fusion.GATE_RECIPE; one native
torch model holding copies of all four) over A-D; tl.soup uniform
and greedy over A-C (canonical weights averaged across backends; BatchNorm recomputed on the
training images). Writes benchmarks/out/fusion.md and fusion.png.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tlbridge import optim  # noqa: E402  (imports no framework)

SHAPE = (32, 32, 3)
RECIPE = dict(epochs=4, batch_size=32, optimizer=optim.SGD(0.01, momentum=0.9, schedule="cosine"),
              unfreeze={0: "head", 2: "all"}, progress=False)


def splits(tl, x, y, seed=0):
    idx = np.random.default_rng(seed).permutation(len(x))
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return [(x[idx[s]], y[idx[s]]) for s in (slice(0, a), slice(a, b), slice(b, None))]


def source_backbone(tl, x_all, digits, path):
    """The demo's pretraining (digits 0-4 on torch), reused from `path` when it is there."""
    if os.path.exists(path):
        return path
    from tlbridge.demo import split
    (xs, ys), _ = split(x_all[digits < 5], np.eye(5)[digits[digits < 5]])
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE, seed=0,
                                         batch_norm=True), 5, seed=1)
    tl.fine_tune(m, (xs, ys), epochs=3, batch_size=32, optimizer=tl.optim.SGD(0.05), progress=False)
    tl.weights.save_file(path, {k: v for k, v in tl.get_weights(m).items()
                                if k.startswith("backbone.")}, {})
    return path


def main(out_dir: str = "benchmarks/out") -> None:
    import tlbridge as tl
    from tlbridge.demo import digits_rgb

    images, digits = digits_rgb()
    x_all = tl.preprocess("seed_vgg", images)
    backbone = source_backbone(tl, x_all, digits,
                               os.path.join(out_dir, "seed_vgg_digits04.safetensors"))
    tgt = digits >= 5
    train, val, test = splits(tl, x_all[tgt], (digits[tgt] >= 7).astype(np.float32)[:, None])

    members, seconds, starts, recipes = train_members(tl, backbone, train)
    ms = list(members.values())
    rows = {name: m for name, m in members.items()}
    fused, same = fuse_members(tl, ms, starts, recipes, train, val, seconds)
    rows.update(fused)
    soups = make_soups(tl, ms[:3], train, val)
    rows.update(soups)

    lines = [f"Digits 5-9, \"is it 7 or more?\": {len(train[0])} train / {len(val[0])} val / "
             f"{len(test[0])} test images. Members fine-tuned {RECIPE['epochs']} epochs (SGD, cosine; "
             f"A-C: head first, then all). Fusion weights and greedy choices use val only; test "
             f"is untouched by any fitting.", ""]
    scores = score_table(tl, rows, val, test, lines)
    lines += ["", *fitted_notes(tl, fused, soups, same, test),
              "Fine-tune seconds per member: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ".",
              "", "Command: `.venv/bin/python benchmarks/fusion.py`"]
    print("\n".join(lines))
    from _out import write_table
    write_table("fusion", lines)
    plot(scores, os.path.join(out_dir, "fusion.png"))


def train_members(tl, backbone, train):
    """Members A-C (the pretrained seed_vgg, one head, three data orders; A on torch, B and C
    on Keras) and D (resnet18 from random init on torch), with their starting points and
    recipes (the out-of-fold stack re-trains from those). Returns (members, seconds, starts,
    recipes)."""
    members, seconds, starts, recipes = {}, {}, [], []
    for label, backend, seed in (("A", "torch", 0), ("B", "keras", 1), ("C", "keras", 2)):
        m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, weights=backbone,
                             batch_norm=True)
        m = tl.replace_head(m, 1, seed=2)
        starts.append(tl.convert(m, backend))
        recipes.append({**RECIPE, "seed": seed})
        t0 = time.perf_counter()
        tl.fine_tune(m, train, **recipes[-1])
        members[f"{label}: seed_vgg pretrained, {backend}, order {seed}"] = m
        seconds[label] = time.perf_counter() - t0
    d = tl.replace_head(tl.load_backbone("resnet18", backend="torch", input_shape=SHAPE, seed=3),
                        1, seed=4)
    starts.append(tl.convert(d, "torch"))
    recipes.append({**RECIPE, "unfreeze": None,
                    "optimizer": optim.SGD(0.05, momentum=0.9, schedule="cosine"), "seed": 3})
    t0 = time.perf_counter()
    tl.fine_tune(d, train, **recipes[-1])
    members["D: resnet18 random init, torch"] = d
    seconds["D"] = time.perf_counter() - t0
    return members, seconds, starts, recipes


def fuse_members(tl, ms, starts, recipes, train, val, seconds):
    """Every tl.fuse method over A-D (timing the out-of-fold stack and the gates into
    `seconds`). Returns (name -> fused model, whether the out-of-fold stack's final members
    are the members, bit for bit)."""
    fused = {
        "mean (logits), A-D": tl.fuse(ms),
        "mean (probabilities), A-D": tl.fuse(ms, space="prob"),
        "weighted (logits, fitted on val), A-D": tl.fuse(ms, "weighted", val=val),
        "weighted (probabilities, fitted on val), A-D": tl.fuse(ms, "weighted", val=val, space="prob"),
        "stack (logistic regression on val logits), A-D": tl.fuse(ms, "stack", val=val),
    }
    t0 = time.perf_counter()      # members re-trained from their starting points: 5 folds each
    stacked = tl.fuse(starts, "stack", train=train, folds=5, fine_tune_kwargs=recipes)
    seconds["stack folds"] = time.perf_counter() - t0
    same = all(np.array_equal(tl.get_weights(a)[k], w) for a, b in zip(stacked.members, ms)
               for k, w in tl.get_weights(b).items())
    fused["stack (out-of-fold on train, 5 folds), A-D"] = stacked
    t0 = time.perf_counter()
    fused["gate on logits (trained on val), A-D"] = tl.fuse(ms, "gate", train=val, val=val,
                                                              backend="torch")
    fused["gate on features, hidden 16 (trained on val), A-D"] = tl.fuse(
        ms, "gate", gate_on="features", hidden=(16,), train=val, val=val, backend="torch")
    seconds["both gates"] = time.perf_counter() - t0
    return fused, same


def make_soups(tl, soupable, train, val):
    """Uniform soups of A-C (BatchNorm recomputed on the training images, or averaged) and a
    greedy soup picked on val."""
    return {
        "uniform soup A-C (BN recomputed)": tl.soup(soupable, bn="recompute", data=train[0],
                                                    warn=False),
        "uniform soup A-C (BN averaged)": tl.soup(soupable, warn=False),
        "greedy soup A-C (val, BN recomputed)": tl.soup(soupable, "greedy", val=val,
                                                        bn="recompute", data=train[0]),
    }


def score_table(tl, rows, val, test, lines):
    """Appends the val / test table of every model to `lines`; returns name -> test scores."""
    lines += ["| model | val loss | val acc | val AUC | test loss | test acc | test AUC |",
              "|---|---|---|---|---|---|---|"]
    scores = {}
    for name, m in rows.items():
        v, t = tl.evaluate(m, val), tl.evaluate(m, test)
        scores[name] = t
        lines.append(f"| {name} | {v['loss']:.4f} | {v['accuracy']:.3f} | {v['auc']:.4f} | "
                     f"{t['loss']:.4f} | {t['accuracy']:.3f} | {t['auc']:.4f} |")
    return scores


def fitted_notes(tl, fused, soups, same, test):
    """What the fitting chose: weighted-fusion weights, the greedy soup's steps, the stacks'
    coefficients, the gates' mean weights on test."""
    greedy = soups["greedy soup A-C (val, BN recomputed)"].report
    return [
        "Fitted weights (A, B, C, D): " + "; ".join(
            f"{k.split(' (')[0]} {k.split('(')[1].split(',')[0]}: "
            f"{np.round(f.weights, 3).tolist()}" for k, f in fused.items() if "weighted" in k),
        "Greedy soup: ingredients " + str([["A", "B", "C"][i] for i in greedy["ingredients"]])
        + ", steps " + "; ".join(
            f"{'+'.join('ABC'[i] for i in s['ingredients'])} val {s['val_loss']:.4f}"
            f" ({'kept' if s['kept'] else 'dropped'})" for s in greedy["steps"]) + ".",
        "Stack coefficients (A, B, C, D; bias): " + "; ".join(
            f"{k.split(' (')[1].split(')')[0]}: {np.round(f.weights[:, 0], 2).tolist()}; "
            f"{f.bias[0]:.2f}" for k, f in fused.items() if k.startswith("stack")) + ". "
        f"The out-of-fold stack's final members are the members above, bit for bit: {same}.",
        "Gates, mean weight per member on test (A, B, C, D): " + "; ".join(
            f"{k.split(' (')[0]}: "
            f"{np.round(tl.gate_weights(f, test[0]).mean(axis=0), 3).tolist()}"
            for k, f in fused.items() if k.startswith("gate")) + f" (recipe "
        f"{tl.fusion.GATE_RECIPE}).",
    ]


def plot(scores: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(names) + 1.2))
    ax.barh(np.arange(len(names)), [scores[n]["loss"] for n in names],
            color=["#888888" if n[:2] in ("A:", "B:", "C:", "D:") else "#3b75af" for n in names])
    ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test BCE (lower is better)")
    ax.set_title("members (grey) and fused models (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(*sys.argv[1:])

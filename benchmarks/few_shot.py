"""Few-shot accuracy on the demo's target digits, from a pretrained and from a random backbone.

    .venv/bin/python benchmarks/few_shot.py [episodes]

Data: scikit-learn's digits (no download), as in `make demo`. The source task (digits 0-4)
pretrains seed_vgg with BatchNorm on torch (benchmarks/fusion.py's `source_backbone`, the
same file); the target is 5-way classification of digits 5-9. For 1, 5 and 10 shots, 100
seeded episodes (tl.data.episodes, 15 queries per class) are scored by tl.few_shot_eval with
prototype (closed-form prototype head), probe (logistic regression on the features, l2 0.01)
and finetune (prototype head, then 10 epochs of SGD lr 0.01 on the support set, head only),
once on the pretrained backbone and once on the same architecture from random init. A Keras
copy of the pretrained backbone repeats the 5-shot prototype run (the backends' agreement).
Writes benchmarks/out/few_shot.md and few_shot.png.
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
SHOTS = (1, 5, 10)
METHODS = ("prototype", "probe", "finetune")
OPTIONS = {"prototype": {}, "probe": {"l2": 0.01},
           "finetune": {"fine_tune_kwargs": {"epochs": 10, "optimizer": optim.SGD(0.01)}}}


def main(n_episodes: str = "100", out_dir: str = "benchmarks/out") -> None:
    import tlbridge as tl
    from fusion import source_backbone
    from tlbridge.demo import digits_rgb

    n_episodes = int(n_episodes)
    images, digits = digits_rgb()
    x_all = tl.preprocess("seed_vgg", images)
    path = source_backbone(tl, x_all, digits, os.path.join(out_dir, "seed_vgg_digits04.safetensors"))
    tgt = digits >= 5
    x, y = x_all[tgt], digits[tgt] - 5
    backbones = {
        "pretrained on digits 0-4": tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE,
                                                     weights=path, batch_norm=True),
        "random init": tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE, seed=0,
                                        batch_norm=True),
    }
    results, seconds = {}, {}
    for shot in SHOTS:
        eps = tl.data.episodes((x, y), n_way=5, n_shot=shot, n_query=15, n_episodes=n_episodes,
                               seed=shot)
        for bname, m in backbones.items():
            for method in METHODS:
                t0 = time.perf_counter()
                results[bname, method, shot] = tl.few_shot_eval(m, eps, method, **OPTIONS[method])
                seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0
    keras_m = tl.convert(backbones["pretrained on digits 0-4"], "keras")
    eps5 = tl.data.episodes((x, y), n_way=5, n_shot=5, n_query=15, n_episodes=n_episodes, seed=5)
    on_keras = tl.few_shot_eval(keras_m, eps5, "prototype")
    same = sum(a == b for a, b in zip(on_keras["per_episode"],
                                      results["pretrained on digits 0-4", "prototype", 5]["per_episode"]))

    lines = [f"Digits 5-9 (5-way), {len(x)} images; {n_episodes} seeded episodes per shot count, "
             f"15 queries per class; accuracy mean ± 95% CI (1.96 standard errors). Chance is 0.200.",
             "", "| backbone | method | " + " | ".join(f"{s}-shot" for s in SHOTS) + " |",
             "|---|---|" + "---|" * len(SHOTS)]
    for bname in backbones:
        for method in METHODS:
            cells = [f"{results[bname, method, s]['accuracy']:.3f} ± {results[bname, method, s]['ci95']:.3f}"
                     for s in SHOTS]
            lines.append(f"| {bname} | {method} | " + " | ".join(cells) + " |")
    lines += ["", f"Same 5-shot prototype episodes on a Keras copy of the pretrained backbone: "
              f"{on_keras['accuracy']:.3f} ± {on_keras['ci95']:.3f}; {same} of {n_episodes} "
              f"episodes give the same query accuracy as on torch (fp32).",
              "Seconds per method (all shots, both backbones): "
              + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ".",
              "", "Command: `.venv/bin/python benchmarks/few_shot.py`"]
    print("\n".join(lines))
    from _out import write_table
    write_table("few_shot", lines)
    plot(results, list(backbones), os.path.join(out_dir, "few_shot.png"))


def plot(results: dict, backbones: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backbones), figsize=(9, 3.4), sharey=True)
    for ax, bname in zip(axes, backbones):
        for method in METHODS:
            acc = [results[bname, method, s]["accuracy"] for s in SHOTS]
            ci = [results[bname, method, s]["ci95"] for s in SHOTS]
            ax.errorbar(SHOTS, acc, yerr=ci, marker="o", capsize=3, label=method)
        ax.axhline(0.2, color="grey", lw=0.8, ls=":")
        ax.set_title(bname, fontsize=10)
        ax.set_xlabel("shots per class")
        ax.set_xticks(SHOTS)
    axes[0].set_ylabel("5-way query accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(*sys.argv[1:])

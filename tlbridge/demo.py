"""`make demo`: one transfer-learning recipe, two frameworks, the same numbers.

Real data that ships with scikit-learn (the 8x8 digits, upscaled to 32x32 RGB; no download):
1. source task: seed_vgg learns digits 0-4 (5 one-hot outputs) on PyTorch -> the "pretrained"
   backbone, saved to one safetensors file;
2. target task: digits 5-9, "is it 7 or more?". The saved backbone is loaded on PyTorch and on
   Keras, gets a new head, is frozen (head trained on cached features), then unfrozen
   gradually and fine-tuned — the same fine_tune call on both backends.
3. real ImageNet weights: MobileNetV2 from torchvision's own checkpoint (packaged, hash-checked)
   beside the same recipe from random init (tlbridge/demo_imagenet.py);
4. real text: zero-shot -> few-shot -> fine-tune of all-MiniLM-L6-v2 on fortunes by topic
   (tlbridge/demo_text.py).
Prints a per-epoch side-by-side table and writes, under benchmarks/out/, a PNG of both loss
curves and demo.md (the transcript benchmarks/fill_readme.py copies into the README).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from . import demo_imagenet, demo_text, optim

SHAPE = (32, 32, 3)
RECIPE = dict(epochs=5, batch_size=32, optimizer=optim.SGD(0.01, momentum=0.9, schedule="cosine"),
              unfreeze={0: "head", 2: ["backbone.features.8", "backbone.features.9"], 3: "all"},
              seed=0, progress=False)


def digits_rgb(size: int = 32):
    """sklearn's 8x8 digits as uint8 RGB images (size x size) and their digit labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    big = np.kron(grey, np.ones((size // 8, size // 8), np.uint8))          # nearest upscale
    return np.repeat(big[..., None], 3, axis=-1), digits.target


def _next_is_bn(bias_key: str, weights: dict) -> bool:
    parts = bias_key.rsplit(".", 2)
    if len(parts) != 3:
        return False
    prefix, idx, _ = parts
    return idx.isdigit() and f"{prefix}.{int(idx) + 1}.running_var" in weights


def split(x, y, frac=0.75, seed=0):
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(frac * len(x))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def main(out_dir: str = "benchmarks/out") -> int:
    import tlbridge as tl

    transcript = ["$ make demo"]

    def say(line: str = "") -> None:
        print(line, flush=True)
        transcript.extend(line.split("\n"))

    os.makedirs(out_dir, exist_ok=True)

    images, digits = digits_rgb()
    x_all = tl.preprocess("seed_vgg", images)
    src, tgt = digits < 5, digits >= 5
    (xs, ys), _ = split(x_all[src], np.eye(5)[digits[src]])
    (xt, yt), (xv, yv) = split(x_all[tgt], (digits[tgt] >= 7).astype(np.float32)[:, None])

    backbone_file = _pretrain(tl, xs, ys, out_dir, say)
    runs = _fine_tune_both(tl, backbone_file, (xt, yt), (xv, yv))
    _report(tl, runs, len(xt), len(xv), say)
    say(f"loss curves: {_plot_losses(runs['torch'][1], runs['keras'][1], out_dir)}")
    demo_imagenet.run(tl, out_dir, say)
    demo_text.run(tl, out_dir, say)
    with open(os.path.join(out_dir, "demo.md"), "w") as f:   # the format of benchmarks/_out.py
        f.write("\n".join(["```", *transcript, "```"]) + "\n")
    return 0


def _pretrain(tl, xs, ys, out_dir: str, say) -> str:
    """Step 1: the source task on torch; its backbone, saved to one safetensors file, is the
    "pretrained" starting point of both backends. Returns the file's path."""
    t0 = time.perf_counter()
    source = tl.load_backbone("seed_vgg", backend="torch", input_shape=SHAPE, seed=0, batch_norm=True)
    source = tl.replace_head(source, 5, seed=1)
    tl.fine_tune(source, (xs, ys), epochs=3, batch_size=32, optimizer=tl.optim.SGD(0.05), progress=False)
    src_acc = tl.evaluate(source, (xs, ys))["accuracy"]
    backbone_file = os.path.join(out_dir, "seed_vgg_digits04.safetensors")
    backbone = {k: v for k, v in tl.get_weights(source).items() if k.startswith("backbone.")}
    tl.weights.save_file(backbone_file, backbone, {})
    say(f"1. source task (digits 0-4, 5 outputs) on torch: {len(xs)} images, train accuracy "
          f"{src_acc:.3f}, {time.perf_counter() - t0:.1f}s; backbone saved to {backbone_file}\n")
    return backbone_file


def _fine_tune_both(tl, backbone_file: str, train, val) -> dict:
    """Step 2: the same recipe on both backends from that file; backend -> (model, history,
    seconds)."""
    (xt, yt), (xv, yv) = train, val
    runs = {}
    for backend in ("torch", "keras"):
        m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, weights=backbone_file,
                             batch_norm=True)
        m = tl.replace_head(m, 1, seed=2)
        t = time.perf_counter()
        hist = tl.fine_tune(m, (xt, yt), val=(xv, yv), **RECIPE)
        runs[backend] = (m, hist, time.perf_counter() - t)
    return runs


def _report(tl, runs: dict, n_train: int, n_val: int, say) -> None:
    """The side-by-side table per epoch, then final accuracy and the weight difference."""
    ht, hk = runs["torch"][1], runs["keras"][1]
    say(f"2. target task (digits 5-9: >= 7?) on both backends from that file: {n_train} train / "
          f"{n_val} val images; SGD lr 0.01 momentum 0.9 cosine, batch 32;")
    say("   epochs 0-1 head only (cached features), epoch 2 + last conv block, epochs 3-4 all\n")
    say(f"{'epoch':>5} {'trainable':>9} {'loss torch':>12} {'loss keras':>12} {'|diff|':>9} "
          f"{'val acc t/k':>12} {'s torch':>8} {'s keras':>8}")
    for et, ek in zip(ht.epochs, hk.epochs):
        say(f"{et['epoch']:>5} {et['trainable']:>9} {et['loss']:>12.8f} {ek['loss']:>12.8f} "
              f"{abs(et['loss'] - ek['loss']):>9.1e} {et['val_accuracy']:>6.3f}/{ek['val_accuracy']:.3f} "
              f"{et['seconds']:>8.2f} {ek['seconds']:>8.2f}")
    wt, wk = tl.get_weights(runs["torch"][0]), tl.get_weights(runs["keras"][0])
    # make_layers puts a conv bias before each BatchNorm: its gradient is zero in exact
    # arithmetic (train-mode BN removes any shift), so it holds rounding noise on both sides
    pre_bn = {k for k in wt if k.endswith(".bias") and _next_is_bn(k, wt)}
    worst, at = tl.parity.worst({k: wt[k] for k in wt if k not in pre_bn},
                                {k: wk[k] for k in wk if k not in pre_bn})
    noise = max(float(max(np.abs(wt[k]).max(), np.abs(wk[k]).max())) for k in pre_bn)
    acc_t, acc_k = ht["val_accuracy"][-1], hk["val_accuracy"][-1]
    say(f"\nfinal val accuracy: torch {acc_t:.4f}, keras {acc_k:.4f}; val AUC torch "
          f"{ht['val_auc'][-1]:.4f}, keras {hk['val_auc'][-1]:.4f}")
    say(f"worst relative weight difference after training (fp32): {worst:.1e} ({at}); the "
          f"{len(pre_bn)} conv biases feeding BatchNorm (zero gradient in exact arithmetic) stay "
          f"below {noise:.0e} on both")
    say(f"fine-tune wall time: torch {runs['torch'][2]:.1f}s, keras {runs['keras'][2]:.1f}s")


def _plot_losses(ht, hk, out_dir: str) -> str:
    """Both backends' train and val loss curves in one PNG; returns its path."""
    png = os.path.join(out_dir, "demo_loss_curves.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for name, h, style in (("torch", ht, "-o"), ("keras", hk, "--x")):
        ax.plot(np.arange(1, len(h) + 1), h["loss"], style, label=f"train loss ({name})")
        ax.plot(np.arange(1, len(h) + 1), h["val_loss"], style, alpha=0.6, label=f"val loss ({name})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE")
    ax.set_title("seed_vgg fine-tuned on digits 5-9 (>= 7?)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

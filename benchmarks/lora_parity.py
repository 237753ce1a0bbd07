"""LoRA parity at scale, float64 torch vs Keras (docs/lora.md): resnet50 at 64x64 (BatchNorm
calibrated) with rank-4 adapters on all 53 convs, and the packaged minilm_l6 with rank-8
adapters on every Linear; B drawn non-zero so every adapter gradient is non-trivial. Prints
the loss and worst gradient differences (eval and train mode) and the resnet50 merge error.

    .venv/bin/python benchmarks/lora_parity.py          (about 2 minutes on 2 CPUs)
"""
from __future__ import annotations

import numpy as np

import tlbridge as tl
from tlbridge import parity

TEXT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _report(name, mt, mk, x, y):
    for training in (False, True):
        r = parity.compare(mt, mk, x, y, training=training)
        print(f"{name} {'train' if training else 'eval'}: loss {r.loss:.1e}, worst gradient "
              f"{r.grads:.1e} ({r.grads_at}), {r.n_grads} gradients", flush=True)


def resnet50(rng):
    mt, _ = parity.pair("resnet50", input_shape=(64, 64, 3), calibrate=2, num_outputs=2)
    tl.add_lora(mt, rank=4, alpha=8, seed=0)
    tl.set_weights(mt, {n: rng.normal(0, 0.05, v.shape) for n, v in tl.get_weights(mt).items()
                        if n.endswith("lora_B.weight")}, strict=False)
    mk = tl.convert(mt, "keras")
    x, y = parity.batch(mt.inputs, 4, 2, seed=3)
    _report("resnet50", mt, mk, x, y)
    z = tl.logits(mt, x)
    tl.merge_lora(mt)
    print(f"resnet50 merge: {np.abs(tl.logits(mt, x) - z).max() / np.abs(z).max():.1e}")


def minilm(rng):
    ms = {b: tl.replace_head(tl.load_backbone("minilm_l6", weights="pretrained", backend=b,
                                              dtype="float64"), 2, seed=1)
          for b in ("torch", "keras")}
    for m in ms.values():
        tl.add_lora(m, rank=8, alpha=16, targets=TEXT, seed=0)
    w = {n: rng.normal(0, 0.02, v.shape) for n, v in tl.get_weights(ms["torch"]).items()
         if n.endswith("lora_B.weight")}
    for m in ms.values():
        tl.set_weights(m, w, strict=False)
    x = tl.tokenize(ms["torch"], ["A man is eating food.", "Stocks fell sharply on Monday.",
                                  "hi", "The new movie is awesome!"])
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], float)
    _report("minilm_l6", ms["torch"], ms["keras"], x, y)


if __name__ == "__main__":
    resnet50(np.random.default_rng(5))
    minilm(np.random.default_rng(5))

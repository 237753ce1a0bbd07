"""LoRA parity at scale (issue 20 item 4), float64 torch vs Keras: resnet50 with an adapter on
every one of its 53 convs, and the packaged minilm_l6 (all-MiniLM-L6-v2) with adapters on the
attention's query/key/value/output dense and the FFN of all 6 layers; B drawn non-zero so every
adapter gradient is non-trivial. Adapters fine-tuned on Keras, saved in peft's layout and
loaded onto torch's pretrained encoder, give the same logits. Small inputs keep it cheap:
benchmarks/lora_parity.py runs the same checks at 64x64 with a larger batch."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends

import tlbridge as tl
from tlbridge import parity

pytestmark = both_backends
TEXT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]
TEXTS = ["A man is eating food.", "Stocks fell sharply on Monday.", "hi",
         "The new movie is awesome!"]


def _nonzero_b(m, scale, seed=5):
    rng = np.random.default_rng(seed)
    w = {n: rng.normal(0.0, scale, v.shape) for n, v in tl.get_weights(m).items()
         if n.endswith("lora_B.weight")}
    tl.set_weights(m, w, strict=False)
    return w


def _adapter_grads_agree(mt, mk, x, y, n_adapted):
    """Base frozen: BatchNorm runs on its running statistics in train mode too, so eval mode is
    the one pass to compare; the gradients are exactly the adapters' and the head's."""
    r = parity.compare(mt, mk, x, y, training=False)
    assert r.loss <= 1e-10 and r.grads <= 1e-10, (r.loss, r.grads, r.grads_at)
    assert r.n_grads == 2 * n_adapted + 2 and not r.zeros
    return r


def test_resnet50_conv_adapters_loss_and_gradients_agree_in_float64():
    """Every conv of resnet50 (7x7 stride-2 stem, 1x1 / 3x3 bottleneck convs, 1x1 stride-2
    downsamples), 32x32, BatchNorm calibrated on a batch (tlbridge.parity.calibrate) so eval
    activations are those of a trained net rather than growing block by block."""
    mt = tl.replace_head(tl.load_backbone("resnet50", backend="torch", input_shape=(32, 32, 3),
                                          dtype="float64", seed=0), 2, seed=1)
    xc, yc = parity.batch(mt.inputs, 4, 2, seed=100)
    parity.calibrate(mt, xc, yc, 1)
    tl.add_lora(mt, rank=2, alpha=4, seed=0)
    assert len(mt.spec.adapters) == 53
    _nonzero_b(mt, 0.05)
    mk = tl.convert(mt, "keras")
    x, y = parity.batch(mt.inputs, 2, 2, seed=3)
    r = _adapter_grads_agree(mt, mk, x, y, 53)
    assert r.stats == 0.0         # no BatchNorm statistic moved on either side


def _minilm(backend, seed=1):
    return tl.replace_head(tl.load_backbone("minilm_l6", weights="pretrained", backend=backend,
                                            dtype="float64"), 2, seed=seed)


@pytest.fixture(scope="module")
def minilm():
    """The packaged encoder on both backends with the same seeded adapters and B."""
    ms = {b: _minilm(b) for b in ("torch", "keras")}
    for m in ms.values():
        tl.add_lora(m, rank=4, alpha=8, targets=TEXT_TARGETS, seed=0)
    w = _nonzero_b(ms["torch"], 0.02)
    tl.set_weights(ms["keras"], w, strict=False)
    return ms


def test_minilm_attention_and_ffn_adapters_loss_and_gradients_agree_in_float64(minilm):
    assert len(minilm["torch"].spec.adapters) == 6 * 6
    x = tl.tokenize(minilm["torch"], TEXTS)
    assert x["attention_mask"].min() == 0          # padded rows: the mask matters
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], float)
    _adapter_grads_agree(minilm["torch"], minilm["keras"], x, y, 36)


def _train_one_epoch(m, x, y):
    before = tl.get_weights(m)
    tl.fine_tune(m, (x, y), epochs=1, batch_size=2, optimizer=tl.optim.AdamW(lr=1e-2),
                 progress=False)
    moved = [k for k, v in tl.get_weights(m).items() if not np.array_equal(v, before[k])]
    assert sorted(moved) == sorted(tl.trainable_names(m))   # every adapter and the head


def _same_logits(a, b, x):
    z = tl.logits(a, x)
    err = np.abs(tl.logits(b, x) - z).max() / np.abs(z).max()
    assert err <= 1e-12, err


def test_minilm_adapters_trained_on_keras_load_on_torch(tmp_path):
    """fine_tune on Keras, tl.save_adapters, tl.load_adapters onto a fresh pretrained encoder
    on torch: the same logits. (Trained on torch, loaded on Keras: tests/test_lora.py, on the
    small BERT, to keep a third encoder build out of the suite.)"""
    mk = tl.add_lora(_minilm("keras"), rank=4, alpha=8, targets=["query", "value"], seed=0)
    x = tl.tokenize(mk, TEXTS)
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], float)
    _train_one_epoch(mk, x, y)
    tl.save_adapters(mk, tmp_path)
    mt = tl.load_adapters(_minilm("torch", seed=7), tmp_path)
    assert mt.spec.adapters == mk.spec.adapters
    _same_logits(mk, mt, x)

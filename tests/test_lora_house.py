"""The rest of the house on a LoRA model (issue 20 item 5): EMA, mixed precision, multi-task
heads, and fusion (mean and gated) of LoRA-tuned members. Checkpoints and resume, new heads,
save/load/convert and soups are in tests/test_lora.py; data-parallel is run 7 of
tests/test_distributed.py. Small models: seed_vgg with BatchNorm (adapters on its convs)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends, learnable, tensorflow_uses_onednn

import tlbridge as tl
from tlbridge import fusion, gate, parity

SHAPE = (16, 16, 3)


def _lora(backend, dtype="float64", seed=0, b_scale=0.0):
    """seed_vgg (BatchNorm) with rank-2 adapters on both convs; B drawn when b_scale > 0."""
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype=dtype, seed=seed,
                         widths=(4, 8), batch_norm=True)
    m = tl.add_lora(tl.replace_head(m, 1, seed=seed + 1), rank=2, alpha=4, seed=seed)
    if b_scale:
        rng = np.random.default_rng(seed + 3)
        tl.set_weights(m, {n: rng.normal(0.0, b_scale, v.shape).astype(dtype)
                           for n, v in tl.get_weights(m).items()
                           if n.endswith("lora_B.weight")}, strict=False)
    return m


def _base(m) -> dict:
    return {k: v for k, v in tl.get_weights(m).items()
            if ".lora_" not in k and not k.startswith(("head.", "heads."))}


def _unchanged(m, base: dict) -> None:
    w = tl.get_weights(m)
    assert all(np.array_equal(w[k], v) for k, v in base.items())


def test_ema_on_a_lora_model_is_the_written_formula_and_leaves_the_base(backend):
    """The average covers the adapters (and the head), step by step; the base's average is
    the base itself, and swapping it in leaves the base as it was."""
    x, y = learnable(24, 0, SHAPE)
    m = _lora(backend)
    start, base = tl.get_weights(m), _base(m)
    after = []
    h = tl.fine_tune(m, (x, y), epochs=2, batch_size=8, progress=False,
                     optimizer=tl.optim.SGD(0.1, ema=tl.optim.EMA(0.8, swap=False)),
                     callbacks=[lambda ev, info: after.append(tl.get_weights(m))
                                if ev == "step" else None])
    want = {k: v.copy() for k, v in start.items()}
    for w in after:
        for k in want:
            want[k] = 0.8 * want[k] + 0.2 * w[k]
    assert set(h.ema_weights) == set(start)
    for k in want:
        np.testing.assert_allclose(h.ema_weights[k], want[k], rtol=1e-13, atol=1e-15)
    assert np.abs(h.ema_weights["backbone.features.0.lora_A.weight"]
                  - start["backbone.features.0.lora_A.weight"]).max() > 1e-4
    swapped = _lora(backend)
    tl.fine_tune(swapped, (x, y), epochs=2, batch_size=8, progress=False,
                 optimizer=tl.optim.SGD(0.1, ema=tl.optim.EMA(0.8)))
    assert parity.worst(tl.get_weights(swapped), h.ema_weights)[0] == 0.0
    _unchanged(swapped, base)


@both_backends
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_the_adapters_in_low_precision_on_both_backends(precision,
                                                                              monkeypatch):
    """float32 LoRA model, B drawn large so the adapters carry much of each output. The first
    step's loss (the same weights and rows): torch and Keras agree to float32 rounding in
    bf16/fp16 (they round at the same places, adapters included), and both differ from the
    float32 run by bf16/fp16 rounding. Master weights stay float32, the base untouched."""
    from tlbridge import devices
    monkeypatch.setattr(devices, "_ALLOW_CPU_FP16", True)     # fp16 kernels are slow on CPU
    x, y = learnable(16, 1, SHAPE)
    x, y = x.astype(np.float32), y.astype(np.float32)
    first = {}
    for backend in ("torch", "keras"):
        for prec in ("fp32", precision):
            m = _lora(backend, "float32", b_scale=0.5)
            base, lora = _base(m), tl.get_weights(m)
            seen = []
            tl.fine_tune(m, (x, y), epochs=1, batch_size=8, optimizer=tl.optim.SGD(1e-3),
                         progress=False, precision=prec,
                         callbacks=[lambda ev, info: seen.append(info["loss"])
                                    if ev == "step" else None])
            first[backend, prec] = seen[0]
            w = tl.get_weights(m)
            assert {str(v.dtype) for v in w.values()} == {"float32"}
            _unchanged(m, base)
            assert not np.array_equal(w["backbone.features.0.lora_A.weight"],
                                      lora["backbone.features.0.lora_A.weight"])
    low = first["torch", precision]
    # with oneDNN both frameworks run the same bf16/fp16 kernels: float32 rounding apart; Eigen's
    # (TF_ENABLE_ONEDNN_OPTS=0) round elsewhere: apart by less than half a unit of the low format
    # (measured 7.3e-4 relative in bf16, 3.8e-5 in fp16)
    bar = 2e-6 if tensorflow_uses_onednn() else {"bf16": 2.0 ** -9, "fp16": 2.0 ** -12}[precision]
    assert abs(low - first["keras", precision]) <= bar * low, first
    assert abs(low - first["torch", "fp32"]) >= 1e-4 * low, first     # low precision ran


@both_backends
def test_multitask_heads_on_a_lora_model_train_alike_on_both_backends():
    """replace_heads (a BCE and an MSE task, missing labels) after add_lora: two epochs, each
    task's loss and every weight agree in float64; the base never moves."""
    x, y = learnable(20, 2, SHAPE)
    labels = {"sign": y[:, 0].copy(), "green": x[:, :, :, 1].mean(axis=(1, 2))}
    labels["sign"][::5] = np.nan
    labels["green"][1::4] = np.nan
    out = {}
    for backend in ("torch", "keras"):
        m = tl.replace_heads(_lora(backend), {"sign": ("bce", 1), "green": ("mse", 1)}, seed=4)
        base, start = _base(m), tl.get_weights(m)
        h = tl.fine_tune(m, (x, labels), epochs=2, batch_size=8, progress=False,
                         optimizer=tl.optim.Adam(1e-2))
        _unchanged(m, base)
        w = tl.get_weights(m)
        assert not np.array_equal(w["backbone.features.4.lora_A.weight"],
                                  start["backbone.features.4.lora_A.weight"])
        out[backend] = (h["loss_sign"] + h["loss_green"], w)
    np.testing.assert_allclose(out["torch"][0], out["keras"][0], rtol=1e-9, atol=0)
    worst, at = parity.worst(out["torch"][1], out["keras"][1], floor_rel=1e-6)
    assert worst <= 1e-9, (worst, at)


def _members(backend):
    """Two LoRA-tuned members (B != 0: their adapters change what they compute)."""
    return [_lora(backend, seed=s, b_scale=0.3) for s in (0, 10)]


def test_mean_fusion_of_lora_members_and_its_round_trip(backend, tmp_path):
    """The mean of the members' logits; saved, loaded and converted with unmerged adapters."""
    members = _members(backend)
    x, _ = learnable(6, 3, SHAPE)
    f = tl.fuse(members, "mean")
    zs = np.stack([tl.logits(m, x) for m in members])
    np.testing.assert_allclose(tl.logits(f, x), zs.mean(0), rtol=0, atol=1e-12)
    tl.save(f, tmp_path / "f.safetensors")
    for other in {backend, "torch" if backend == "keras" else "keras"} & set(tl.available_backends()):
        g = tl.load(tmp_path / "f.safetensors", backend=other)
        assert [m.spec.adapters for m in g.members] == [m.spec.adapters for m in members]
        np.testing.assert_allclose(tl.logits(g, x), zs.mean(0), rtol=0, atol=1e-12)


@both_backends
def test_gated_fusion_of_lora_members_trains_alike_and_leaves_the_members():
    """tl.fuse(..., "gate") over LoRA members: untrained, the mean of the members' logits
    (their adapters at work inside the gate); the gate's fine_tune agrees across backends in
    float64, no member weight moves (adapters included), and the trained fusion converts."""
    members = _members("torch")
    x, _ = learnable(24, 4, SHAPE)
    y = (x.mean(axis=(1, 2, 3))[:, None] > 0).astype(np.float64)
    mean = np.stack([tl.logits(m, x) for m in members]).mean(0)
    out = {}
    for backend in ("torch", "keras"):
        f = tl.fuse(members, "gate", gate_on="features", hidden=(4,), backend=backend)
        np.testing.assert_allclose(tl.logits(f, x), mean, rtol=0, atol=1e-12)
        before = [tl.get_weights(m) for m in f.members]
        h = tl.fine_tune(f, (x, y), epochs=2, batch_size=8, optimizer=tl.optim.SGD(0.05),
                         progress=False)
        for m, b in zip(f.members, before):
            assert m.spec.adapters and parity.worst(tl.get_weights(m), b)[0] == 0.0
        out[backend] = (f, h["loss"], gate.head_weights(f.gate))
    np.testing.assert_allclose(out["torch"][1], out["keras"][1], rtol=1e-9, atol=0)
    assert parity.worst(out["torch"][2], out["keras"][2])[0] <= 1e-9
    ft = out["torch"][0]
    assert np.ptp(fusion.gate_weights(ft, x), axis=0).max() > 1e-3    # the gate learned
    np.testing.assert_allclose(tl.logits(tl.convert(ft, "keras"), x), tl.logits(ft, x),
                               rtol=0, atol=1e-10)

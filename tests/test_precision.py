"""Mixed precision: fine_tune(..., precision="bf16"|"fp16"|"fp32").

On the CPU, bf16 must run and converge on the demo task (digits 5-9, "7 or more?") on both
backends with float32 master weights. fp16 needs a GPU and is refused on the CPU; its loss
scaling is exercised here anyway through tlbridge.devices._ALLOW_CPU_FP16 (the CPU has slow
but correct float16 kernels on both frameworks).
"""
from __future__ import annotations

import numpy as np
import pytest

import tlbridge as tl
from helpers import BACKENDS, learnable


@pytest.fixture(scope="module")
def digits():
    from tlbridge import demo
    images, labels = demo.digits_rgb(16)
    keep = labels >= 5
    x = images[keep].astype(np.float32) / 255.0
    y = (labels[keep] >= 7).astype(np.float32)[:, None]
    (xt, yt), (xv, yv) = demo.split(x, y)
    return (xt, yt), (xv, yv)


def _model(backend, seed=3):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), seed=seed,
                         batch_norm=True)
    return tl.replace_head(m, 1, seed=seed + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_converges_on_the_demo_task(backend, digits):
    (xt, yt), (xv, yv) = digits
    runs = {}
    for precision in ("fp32", "bf16"):
        m = _model(backend)
        h = tl.fine_tune(m, (xt, yt), val=(xv, yv), epochs=4, batch_size=32, optimizer=tl.optim.Adam(0.003), progress=False, precision=precision)
        assert {str(v.dtype) for v in tl.get_weights(m).values()} == {"float32"}  # master
        runs[precision] = h
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16["loss"][-1] < 0.5 * bf16["loss"][0]             # it learns
    assert bf16["val_accuracy"][-1] >= 0.85
    assert abs(bf16["val_accuracy"][-1] - fp32["val_accuracy"][-1]) <= 0.05
    # the first epoch starts from the same weights: bf16 rounding (8-bit mantissa) moves the
    # mean loss by far less than a percent, but it does move it (bf16 really ran)
    first = abs(bf16["loss"][0] - fp32["loss"][0]) / fp32["loss"][0]
    assert 0 < first <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_loss_scaling_skips_overflowing_steps_and_trains(backend, monkeypatch):
    """fp16 starts with a loss scale of 2^16; when scaled gradients overflow, the step is
    skipped (no update, no step count) and the scale halves; training then goes on."""
    from tlbridge import devices
    monkeypatch.setattr(devices, "_ALLOW_CPU_FP16", True)
    x, y = learnable(128, seed=0)
    m = _model(backend)
    h = tl.fine_tune(m, (x.astype(np.float32), y), epochs=3, batch_size=16, optimizer=tl.optim.Adam(0.01), progress=False, precision="fp16")
    assert h["loss"][-1] < 0.6 * h["loss"][0]
    assert {str(v.dtype) for v in tl.get_weights(m).values()} == {"float32"}


def test_fp16_loss_scale_matches_torch_gradscaler(monkeypatch):
    """Keras' loss scaling follows torch.amp.GradScaler: the same start (2^16), halving on
    overflow and skipped steps, so both backends skip the same steps and their losses agree
    to float16 rounding."""
    if not {"torch", "keras"} <= set(BACKENDS):
        pytest.skip("needs both backends")
    from tlbridge import devices
    monkeypatch.setattr(devices, "_ALLOW_CPU_FP16", True)
    x, y = learnable(64, seed=0)
    losses, scales = {}, {}
    for backend in ("torch", "keras"):
        m = _model(backend)
        seen = []
        h = tl.fine_tune(m, (x.astype(np.float32), y), epochs=2, batch_size=8,
                         optimizer=tl.optim.SGD(0.01), progress=False, precision="fp16",
                         callbacks=[lambda ev, info: seen.append(info["loss_scale"])
                                    if ev == "step" else None])
        losses[backend], scales[backend] = np.array(h["loss"]), seen
    assert min(scales["keras"]) < 2.0 ** 16     # overflowing steps were skipped, scale halved
    assert scales["keras"] == scales["torch"], (scales["torch"], scales["keras"])   # step by step
    assert np.max(np.abs(losses["torch"] - losses["keras"]) / losses["torch"]) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_precision_is_refused(backend):
    from tlbridge.errors import DataError
    x, y = learnable(8)
    m = _model(backend)
    before = tl.get_weights(m)
    with pytest.raises(DataError, match=r"GPU for precision='fp16'.*bf16"):
        tl.fine_tune(m, (x.astype(np.float32), y), precision="fp16", progress=False)
    with pytest.raises(DataError, match="precision as one of"):
        tl.fine_tune(m, (x.astype(np.float32), y), precision="half", progress=False)
    m64 = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), seed=0,
                           dtype="float64")
    m64 = tl.replace_head(m64, 1, seed=1)
    with pytest.raises(DataError, match="float32 model for precision='bf16'"):
        tl.fine_tune(m64, (x, y), precision="bf16", progress=False)
    after = tl.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_fp16_devices_per_backend():
    """fp16 on a CUDA GPU on both backends, and on Apple's MPS with torch (float16 autocast
    and GradScaler on MPS); no machine here has MPS, so the rule is checked, not run. A
    Keras model on 'mps' (TensorFlow has none) and any model on the CPU are refused, saying
    why."""
    from tlbridge import devices
    from tlbridge.errors import DataError
    for backend, device in (("torch", "cuda:0"), ("torch", "mps"), ("keras", "cuda:1")):
        assert devices.check_precision("fp16", "float32", device, backend) == "fp16"
    with pytest.raises(DataError, match=r"CUDA GPU .* 'mps': TensorFlow has no MPS device"):
        devices.check_precision("fp16", "float32", "mps", "keras")
    with pytest.raises(DataError, match=r"GPU for precision='fp16' \(CUDA, or Apple MPS on "
                                        r"torch\); .*no fast float16 kernels.*bf16"):
        devices.check_precision("fp16", "float32", "cpu", "torch")
    with pytest.raises(DataError, match=r"GPU for precision='fp16' \(CUDA\); received a keras"):
        devices.check_precision("fp16", "float32", "cpu", "keras")
    assert devices.check_precision("bf16", "float32", "mps", "torch") == "bf16"


def test_torch_mixed_precision_needs_autocast_on_its_device():
    """The torch trainer runs the forward pass under torch.autocast(device type): this torch
    autocasts on MPS (float16 since torch 2.5); a device type without autocast is refused
    before any step, naming the torch version."""
    import re

    import torch
    from tlbridge.errors import DataError
    from tlbridge.registry import load
    load("torch")
    from tlbridge.backends.torch.training import check_autocast
    check_autocast("mps", "fp16")
    check_autocast("cuda", "fp16")
    version = re.escape(torch.__version__)
    with pytest.raises(DataError, match=rf"device type 'meta' .*torch {version}"):
        check_autocast("meta", "fp16")

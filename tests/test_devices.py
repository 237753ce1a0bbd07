"""Devices (issue 11, first part): device names, where a model lives (m.device), moving it,
clear errors for devices the machine lacks, and TF32 control. The GPU cases run only where
a GPU exists (benchmarks/gpu_check.py runs the same checks as one script on a lent GPU)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, both_backends, learnable

import tlbridge as tl
from tlbridge import devices, errors, parity, registry

SHAPE = (16, 16, 3)


def _model(backend, device="cpu", dtype="float64"):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, dtype=dtype, seed=0,
                         widths=(4, 8), batch_norm=True, device=device)
    return tl.replace_head(m, 2, seed=1)


def _gpus(backend) -> list:
    return [d for d in registry.load(backend).devices.available() if d != "cpu"]


def test_cpu_by_default_and_auto_picks_the_first_gpu_or_the_cpu(backend):
    assert _model(backend).device == "cpu"
    auto = _model(backend, "auto")
    assert auto.device == (_gpus(backend) or ["cpu"])[0]
    assert tl.replace_head(auto, 3).device == auto.device      # a new head joins the backbone


def test_a_device_the_machine_lacks_is_refused_naming_what_it_has(backend):
    have = registry.load(backend).devices.available()
    missing = f"cuda:{len(have) + 3}"
    with pytest.raises(errors.DeviceNotAvailableError, match=r"sees \['cpu'"):
        tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, device=missing)
    with pytest.raises(errors.DataError, match="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        tl.load_backbone("seed_vgg", backend=backend, input_shape=SHAPE, device="tpu")
    m = _model(backend)
    with pytest.raises(errors.DeviceNotAvailableError):
        tl.to_device(m, missing)
    assert m.device == "cpu"


def test_to_device_moves_in_place_with_weights_and_freeze_state(backend):
    m = tl.freeze(_model(backend), "backbone")
    w, frozen = tl.get_weights(m), set(m.frozen)
    assert tl.to_device(m, "cpu") is m and m.device == "cpu"
    m.state["device"] = "cuda:0"       # as if it lived on a GPU: moving back rebuilds or moves it
    tl.to_device(m, "cpu")
    assert m.device == "cpu" and m.frozen == frozen
    assert all(np.array_equal(v, tl.get_weights(m)[k]) for k, v in w.items())
    x, y = learnable(8, 0, SHAPE)
    h = tl.fine_tune(m, (x, np.hstack([y, 1 - y])), epochs=1, progress=False)
    assert len(h) == 1


def test_set_precision_switches_tf32_on_both_frameworks_and_parity_turns_it_off():
    import tensorflow as tf
    _model(BACKENDS[0])
    before = tl.set_precision(tf32=True)
    torch_tf32 = registry.load("torch").devices.tf32_enabled if "torch" in before else None
    try:
        if torch_tf32:
            assert torch_tf32() == (True, True)
        if "keras" in before:
            assert tf.config.experimental.tensor_float_32_execution_enabled()
        with devices.precision(tf32=False):
            if torch_tf32:
                assert torch_tf32() == (False, False)
            if "keras" in before:
                assert not tf.config.experimental.tensor_float_32_execution_enabled()
        if torch_tf32:
            assert torch_tf32() == (True, True)                 # restored after the block
    finally:
        devices.restore_precision(before)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch's own precision API")
def test_a_set_precision_round_trip_keeps_torchs_own_matmul_precision():
    """Issue 23 item 4: the legacy allow_tf32 flags, once set, made torch's
    get_float32_matmul_precision() raise ("mix of the legacy and new APIs")."""
    import torch
    tdev = registry.load("torch").devices
    own = torch.get_float32_matmul_precision()
    start = tdev.set_tf32(False)
    tdev.set_tf32(start)
    a, b = (torch.from_numpy(np.random.default_rng(i).normal(size=(128, 128))) for i in (0, 1))
    exact = (a @ b).float()
    try:
        torch.set_float32_matmul_precision("medium")
        previous = tl.set_precision(tf32=False)
        assert tdev.tf32_enabled()[0] is False
        # "medium" makes oneDNN matmuls bf16 on AMX CPUs (errors ~1e-1): forbidding means IEEE
        assert (a.float() @ b.float() - exact).abs().max().item() <= 1e-4
        devices.restore_precision(previous)
        assert torch.get_float32_matmul_precision() == "medium"
        assert tdev.tf32_enabled() == (True, True)
    finally:
        torch.set_float32_matmul_precision(own)     # "medium" leaked bf16 matmuls into later tests
        tdev.set_tf32(start)


@pytest.mark.skipif("keras" not in BACKENDS, reason="needs TensorFlow")
def test_set_precision_reaches_a_backend_started_later():
    """Issue 23 item 5: set_precision(tf32=False) before TensorFlow was imported left TF32 on
    there (a later convert to Keras ran with it); the choice is recorded and applied when a
    backend starts, and restore_precision undoes it there too."""
    import subprocess
    import sys
    code = (
        "import sys, tlbridge as tl\n"
        "from tlbridge import devices, registry\n"
        "previous = tl.set_precision(tf32=False)\n"
        "assert 'tensorflow' not in sys.modules\n"
        "registry.load('keras')\n"
        "import tensorflow as tf\n"
        "print('during', tf.config.experimental.tensor_float_32_execution_enabled())\n"
        "devices.restore_precision(previous)\n"
        "print('after', tf.config.experimental.tensor_float_32_execution_enabled())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "during False" in out.stdout and "after True" in out.stdout


@both_backends
def test_convert_and_load_place_the_model(tmp_path):
    m = _model("torch")
    k = tl.convert(m, "keras")
    assert k.device == "cpu"
    tl.save(m, tmp_path / "m.safetensors")
    assert tl.load(tmp_path / "m.safetensors", backend="keras", device="auto").device == \
        (_gpus("keras") or ["cpu"])[0]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _gpus(b)] or
                         [pytest.param("none", marks=pytest.mark.skip("no GPU here"))])
def test_on_a_gpu_fp64_parity_and_a_fine_tune_step_match_the_cpu(backend):
    """Runs where a GPU exists: the model on the GPU against the same model on the CPU."""
    x, y = learnable(8, 1, SHAPE)
    y = np.hstack([y, 1 - y])
    cpu, gpu = _model(backend), _model(backend, "cuda")
    with devices.precision(tf32=False):
        lc, gc = tl.loss_and_grads(cpu, x, y, training=True)
        lg, gg = tl.loss_and_grads(gpu, x, y, training=True)
    assert abs(lc - lg) <= 1e-10
    zeros = parity.zero_set(gc)
    assert max(parity.rel_errors(gg, gc, skip=zeros).values()) <= 1e-10
    for m in (cpu, gpu):
        tl.fine_tune(m, (x, y), epochs=1, batch_size=4, progress=False)
    assert parity.worst(tl.get_weights(cpu), tl.get_weights(gpu), floor_rel=1e-6)[0] <= 1e-9

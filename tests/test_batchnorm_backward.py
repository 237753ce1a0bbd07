"""Keras train-mode BatchNorm uses torch's closed-form backward, so its float32 gradients are as
accurate as torch's against float64 (autodiff through mean and variance was ~50x worse)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import both_backends

pytestmark = both_backends


def _torch_grads(x, r, gamma, beta, dtype):
    import torch
    bn = torch.nn.BatchNorm2d(x.shape[-1], eps=1e-5).to(getattr(torch, dtype)).train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma.astype(dtype)))
        bn.bias.copy_(torch.from_numpy(beta.astype(dtype)))
    xt = torch.from_numpy(x.astype(dtype)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    rt = torch.from_numpy(r.astype(dtype)).permute(0, 3, 1, 2)
    (bn(xt) * rt).sum().backward()
    return {"x": xt.grad.permute(0, 2, 3, 1).numpy(), "gamma": bn.weight.grad.numpy(),
            "beta": bn.bias.grad.numpy(), "running_var": bn.running_var.detach().numpy(),
            "running_mean": bn.running_mean.detach().numpy()}


def _keras_grads(x, r, gamma, beta, dtype):
    import tensorflow as tf
    from tlbridge.backends.keras.network import TorchBatchNorm
    bn = TorchBatchNorm(1e-5, 0.1, dtype=dtype)
    bn.build(x.shape)
    bn.gamma.assign(gamma.astype(dtype))
    bn.beta.assign(beta.astype(dtype))
    xt = tf.constant(x.astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(bn(xt, training=True) * r.astype(dtype))
    gx, gg, gb = tape.gradient(loss, [xt, bn.gamma.value, bn.beta.value])
    return {"x": gx.numpy(), "gamma": gg.numpy(), "beta": gb.numpy(),
            "running_var": bn.moving_variance.numpy(), "running_mean": bn.moving_mean.numpy()}


def _err(a, truth):
    return float(np.abs(a.astype(np.float64) - truth).max() / np.abs(truth).max())


@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["centred", "offset30"])
@pytest.mark.parametrize("n", [8, 16, 32])
def test_float32_batchnorm_gradients_are_as_accurate_as_torchs(n, offset):
    rng = np.random.default_rng(n)
    c = 24
    # inputs on the float32 grid, channels with a large mean against their spread (cancellation)
    x = (offset + rng.normal(size=(n, 5, 5, c)) * rng.uniform(0.05, 2.0, size=c)).astype(np.float32).astype(np.float64)
    r = rng.normal(size=x.shape).astype(np.float32).astype(np.float64)
    gamma = rng.uniform(0.5, 1.5, size=c).astype(np.float32).astype(np.float64)
    beta = rng.normal(size=c).astype(np.float32).astype(np.float64)
    truth = _torch_grads(x, r, gamma, beta, "float64")
    keras64 = _keras_grads(x, r, gamma, beta, "float64")
    for k in truth:
        assert _err(keras64[k], truth[k]) <= 1e-12, k
    t32 = _torch_grads(x, r, gamma, beta, "float32")
    k32 = _keras_grads(x, r, gamma, beta, "float32")
    for k in truth:
        et, ek = _err(t32[k], truth[k]), _err(k32[k], truth[k])
        assert ek <= max(1e-6, 2 * et), f"{k}: keras {ek:.2g} vs torch {et:.2g} against float64"


def test_float32_train_steps_on_tensorflow_run_the_fused_kernel_and_float64_the_closed_form():
    """The fused kernel is the speed of a float32 step on TensorFlow (fused_bn.py); a fallback to
    the float64-accumulating closed form would pass every accuracy test and cost 1.3 x."""
    import keras
    if keras.backend.backend() != "tensorflow":
        pytest.skip("FusedBatchNormV3 is TensorFlow's kernel")
    import tensorflow as tf
    from tlbridge.backends.keras.network import TorchBatchNorm

    def ops_of(dtype):
        bn = TorchBatchNorm(1e-5, 0.1, dtype=dtype)
        bn.build((4, 3, 3, 8))

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(bn(x, training=True) ** 2)
            return tape.gradient(loss, [x, bn.gamma.value])

        graph = step.get_concrete_function(tf.TensorSpec((None, 3, 3, 8), dtype)).graph
        # a cast of a tensor (not of the batch size): the float64 copy the fused path avoids
        return {op.type for op in graph.get_operations()
                if op.type != "Cast" or op.outputs[0].shape.rank != 0}

    f32, f64 = ops_of("float32"), ops_of("float64")
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= f32, sorted(f32)
    assert "FusedBatchNormV3" not in f64 and "Cast" not in f32


def test_float32_batchnorm_on_repeated_pixels_is_as_accurate_as_torchs():
    """Upscaled images repeat each value many times; float32 sums over N*H*W terms then round
    the same way at every term, and the fused kernel's variance was 2.5e-5 off (torch sums in
    float64): 5x torch's gradient error on the demo's digits, 40x its drift from float64 over
    five epochs. fused_bn._sum adds in stages."""
    x, r, gamma, beta = bn_case("repeated")
    truth = _torch_grads(x, r, gamma, beta, "float64")
    t32 = _torch_grads(x, r, gamma, beta, "float32")
    k32 = _keras_grads(x, r, gamma, beta, "float32")
    for k in truth:
        et, ek = _err(t32[k], truth[k]), _err(k32[k], truth[k])
        assert ek <= max(1e-6, 2 * et), f"{k}: keras {ek:.2g} vs torch {et:.2g} against float64"


def bn_case(case: str, seed: int = 0):
    """float32-grid (x, r, gamma, beta): "repeated" is a 32x32 batch upscaled from 4x4 (each
    value 16 times over, as the demo's digits), "offset30" channels with a large mean against
    their spread (also tests/test_keras_jax.py)."""
    rng = np.random.default_rng(seed)
    c = 8
    if case == "repeated":
        small = np.maximum(rng.normal(size=(32, 4, 4, c)), 0.0) * rng.uniform(0.5, 2.0, size=c)
        small += 0.3
        x = np.kron(small, np.ones((1, 8, 8, 1)))
    else:
        x = 30.0 + rng.normal(size=(32, 5, 5, c)) * rng.uniform(0.05, 2.0, size=c)
    grid = lambda a: np.asarray(a, np.float32).astype(np.float64)   # noqa: E731
    return (grid(x), grid(rng.normal(size=x.shape)), grid(rng.uniform(0.5, 1.5, size=c)),
            grid(rng.normal(size=c)))


"""bf16 that pays on the CPU for Keras on TensorFlow (issue 21 item 5): in a bf16 step the
kernel gradient of 1x1 and small-output convolutions is a matmul (convgrad.py; oneDNN's bf16
backward-weights kernel runs no faster than fp32), and BatchNorm's sums are float32, not float64.
Both change only the bf16/fp16 steps: the fp32 and fp64 graphs are the ones parity is proven on.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

import tlbridge as tl
from helpers import BACKENDS


def _tensorflow():
    if "keras" not in BACKENDS:
        pytest.skip("Keras is not installed")
    tl.registry.load("keras")
    import keras
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the bf16 convolution gradient is TensorFlow's (oneDNN) fix")
    import tensorflow as tf
    return tf


@pytest.mark.parametrize("kernel,stride,size", [(1, 1, 5), (1, 2, 6), (3, 1, 6), (3, 2, 7),
                                                (7, 2, 11)])
def test_matmul_kernel_gradient_equals_the_convolutions(kernel, stride, size):
    tf = _tensorflow()
    from tlbridge.backends.keras import convgrad
    rng = np.random.default_rng(kernel * 10 + stride)
    x = tf.constant(rng.standard_normal((3, size, size + 1, 4)))
    w = tf.constant(rng.standard_normal((kernel, kernel, 4, 5)))
    dy_seed = tf.constant(rng.standard_normal((5,)))
    grads = []
    for conv in (lambda a, b: tf.nn.conv2d(a, b, stride, "VALID"),
                 lambda a, b: convgrad.conv2d(a, b, stride)):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv(x, w)
            loss = tf.reduce_sum(tf.sin(y) * dy_seed)
        grads.append([y, *tape.gradient(loss, [x, w])])
    for ours, theirs in zip(grads[1], grads[0]):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-12)


def _step_graph(precision):
    rng = np.random.default_rng(0)
    x = rng.random((40, 16, 16, 3), dtype=np.float32)
    y = (rng.random((40, 1)) > 0.5).astype(np.float32)
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(16, 16, 3),
                                         seed=0, batch_norm=True), 1, seed=1)
    tl.fine_tune(m, (x, y), epochs=1, batch_size=32, progress=False, precision=precision,
                 feature_cache=False)
    (step,) = m.state["_train"].steps.values()
    ops = step.get_concrete_function().graph.get_operations()
    return (collections.Counter(op.type for op in ops),
            sum(t.dtype.name == "float64" for op in ops for t in op.outputs))


def test_keras_bf16_step_takes_the_matmul_gradient_and_no_float64():
    """seed_vgg at 16x16: its last conv has 4x4 outputs, so its kernel gradient is a matmul in
    bf16; BatchNorm runs TensorFlow's fused float32 kernel in both steps (fused_bn.py), with no
    float64 anywhere."""
    _tensorflow()
    fp32, fp32_f64 = _step_graph("fp32")
    bf16, bf16_f64 = _step_graph("bf16")
    assert fp32["Conv2DBackpropFilter"] == 3 and bf16["Conv2DBackpropFilter"] == 2
    assert bf16["MatMul"] == fp32["MatMul"] + 1
    assert fp32["FusedBatchNormV3"] == bf16["FusedBatchNormV3"] == 3
    assert fp32_f64 == bf16_f64 == 0


def test_depthwise_convolutions_stay_float32_in_a_bf16_step():
    """oneDNN's bf16 depthwise input gradient took 10x its fp32 time (MobileNetV2): on
    TensorFlow the mixed policy leaves depthwise convolutions in float32. BatchNorm takes bf16
    (the fused kernel computes in float32: the next test)."""
    _tensorflow()
    import keras
    from tlbridge.backends.keras.mixed import mixed_policy
    from tlbridge.backends.keras.network import Conv2D, TorchBatchNorm
    inputs = keras.Input((8, 8, 4))
    dw, conv, bn = keras.layers.DepthwiseConv2D(3), Conv2D(4, 1), TorchBatchNorm()
    model = keras.Model(inputs, bn(conv(dw(inputs))))
    with mixed_policy(model, "bf16"):
        assert dw.compute_dtype == "float32" and bn.compute_dtype == "bfloat16"
        assert conv.compute_dtype == "bfloat16" and bn.accumulate == "float32"
    assert conv.compute_dtype == "float32" and bn.compute_dtype == "float32"
    assert bn.accumulate == "float64"


@pytest.mark.parametrize("training", [True, False])
def test_keras_bf16_batchnorm_computes_in_float32_and_rounds_its_output_once(training):
    """As torch's kernel given a bf16 input and keras' BatchNormalization under its mixed
    policy: float32 weights and statistics, the output within 1 bf16 ulp of float32 BatchNorm
    on the same input (a bf16 computation is 50-80 ulps off). Training: the fused kernel on
    the bf16 input; a frozen BatchNorm (eval): float32 between two casts."""
    tf = _tensorflow()
    import keras
    from tlbridge.backends.keras.mixed import mixed_policy
    from tlbridge.backends.keras.network import TorchBatchNorm
    rng = np.random.default_rng(0)
    bn = TorchBatchNorm(momentum=0.5)
    model = keras.Sequential([keras.Input((4, 4, 16)), bn])
    bn.set_weights([rng.uniform(0.5, 2, 16), rng.uniform(-1, 1, 16), rng.normal(size=16),
                    rng.uniform(0.5, 2, 16)])
    x = tf.cast(rng.normal(2.0, 3.0, (8, 4, 4, 16)).astype(np.float32), tf.bfloat16)
    xf = tf.cast(x, tf.float32).numpy()           # exact: every bf16 is a float32
    g, b, mean, var = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean,
                                          bn.moving_variance))
    if training:
        bmean, bvar = xf.mean((0, 1, 2)), xf.var((0, 1, 2))
        ref = (xf - bmean) / np.sqrt(bvar + bn.epsilon) * g + b
    else:
        ref = (xf - mean) / np.sqrt(var + bn.epsilon) * g + b
    with mixed_policy(model, "bf16"):
        y = bn(x, training=training)
    assert y.dtype == tf.bfloat16
    assert bn.gamma.dtype == bn.moving_mean.dtype == "float32"
    ulp = np.maximum(np.abs(ref), 1e-2) * 2.0 ** -7
    assert np.max(np.abs(tf.cast(y, tf.float32).numpy() - ref) / ulp) <= 1.0
    if training:                                  # torch's momentum, unbiased running variance
        n = xf.size // 16
        np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * mean + 0.5 * bmean, rtol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(),
                                   0.5 * var + 0.5 * bvar * n / (n - 1), rtol=1e-5)


def test_torch_bf16_steps_run_channels_last_and_leave_the_model_as_it_was():
    """torch's bf16 convolutions in channels_last memory (oneDNN's bf16 layout; 1.52x fp32 on
    ResNet-50 against 1.32x in NCHW, docs/devices-and-data-parallel.md); fp32 ResNet keeps NCHW
    (no grouped convolutions: tests/test_channels_last.py), and the model leaves fine_tune in
    NCHW either way."""
    if "torch" not in BACKENDS:
        pytest.skip("torch is not installed")
    import torch
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 3), dtype=np.float32)
    y = (rng.random((8, 1)) > 0.5).astype(np.float32)
    for precision, expected in (("bf16", True), ("fp32", False)):
        m = tl.replace_head(tl.load_backbone("resnet18", backend="torch", input_shape=(32, 32, 3),
                                             seed=0), 1, seed=1)
        conv = next(mod for mod in m.native.modules() if isinstance(mod, torch.nn.Conv2d))
        seen = []
        conv.register_forward_hook(lambda mod, args, out: seen.append(
            (args[0].is_contiguous(memory_format=torch.channels_last),
             out.is_contiguous(memory_format=torch.channels_last), out.dtype)))
        tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, precision=precision,
                     feature_cache=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen == [(expected, expected, dtype)], precision
        assert all(p.is_contiguous() for p in m.native.parameters())


def test_torch_bf16_depthwise_convolutions_run_in_float32_and_return_bf16():
    """As on TensorFlow: oneDNN's bf16 depthwise kernels are its slow ones (MobileNetV2's bf16
    step 0.74x fp32 with them, 1.11x without). The depthwise convolution computes in float32
    outside autocast and returns bf16; the other convolutions stay under autocast; nothing is
    left on the modules afterwards, and an fp32 step is untouched."""
    if "torch" not in BACKENDS:
        pytest.skip("torch is not installed")
    import torch
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 3), dtype=np.float32)
    y = (rng.random((8, 1)) > 0.5).astype(np.float32)
    for precision in ("bf16", "fp32"):
        m = tl.replace_head(tl.load_backbone("mobilenet_v3_small", backend="torch",
                                             input_shape=(32, 32, 3), seed=0), 1, seed=1)
        convs = [mod for mod in m.native.modules() if isinstance(mod, torch.nn.Conv2d)]
        seen = collections.defaultdict(set)
        for mod in convs:
            kind = "depthwise" if mod.groups == mod.in_channels > 1 else "other"
            mod._conv_forward = (lambda inp, w, b, mod=mod, kind=kind: (
                seen[kind].add((inp.dtype, torch.is_autocast_enabled("cpu"))),
                torch.nn.Conv2d._conv_forward(mod, inp, w, b))[1])
            if kind == "depthwise":
                mod.register_forward_hook(lambda mod, a, out: seen["out"].add(out.dtype))
        tl.fine_tune(m, (x, y), epochs=1, batch_size=8, progress=False, precision=precision,
                     feature_cache=False)
        low = precision == "bf16"
        assert seen["depthwise"] == {(torch.float32, False)}, (precision, seen)
        assert seen["out"] == {torch.bfloat16 if low else torch.float32}
        assert {enabled for _, enabled in seen["other"]} == {low}
        assert not any("forward" in vars(mod) for mod in convs)

"""Train-mode BatchNorm on TensorFlow by its fused kernel, for float32 and bf16 inputs.

The closed form in network._batch_norm_train accumulates its sums in float64, as torch's CPU
kernel does; on TensorFlow each float64 cast is a full copy of the activation, and those copies
made tlbridge's float32 MobileNetV2 step 1.28 x the time of keras.applications' (measured).
FusedBatchNormV3 (oneDNN's kernel where TensorFlow enables it, Eigen's otherwise) computes the
same closed form, forward and backward (FusedBatchNormGradV3), in one pass, accumulating in
float32. Alone, that loses torch's accuracy where a channel's mean is large against its spread
(tests/test_batchnorm_backward.py, offset30: 2.9 x torch's gradient error). So the kernel sees
x minus its float32 batch mean: BatchNorm's output and gradients do not change under a
per-channel shift, and the shifted channels have no mean left to cancel; the mean comes back as
shift + the kernel's mean of the residual (a two-pass mean, float64-like for the running mean).
"""
from __future__ import annotations

import tensorflow as tf


def applies(x) -> bool:
    """float32 NHWC activations (BatchNorm2d); float64 and half precision keep the closed form."""
    return x.dtype == tf.float32 and x.shape.rank == 4


def batch_norm_train(x, gamma, beta, epsilon: float):
    """(batch mean, unbiased batch variance, output) of a float32 NHWC x; the unbiased variance
    is what torch's running variance stores (docs/parity.md #2)."""
    shift = tf.stop_gradient(tf.reduce_mean(x, axis=[0, 1, 2], keepdims=True))
    residual, var, y = _fused(x - shift, gamma, beta, epsilon)
    return tf.reshape(shift, [-1]) + residual, var, y


def _fused(x, gamma, beta, epsilon: float):
    """(batch mean, unbiased batch variance, output) by FusedBatchNormV3 in training mode, with
    float32 scale, offset and statistics whatever x's dtype."""
    empty = tf.constant([], tf.float32)
    y, mean, var, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.convert_to_tensor(gamma), offset=tf.convert_to_tensor(beta),
        mean=empty, variance=empty, epsilon=epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True)
    return mean, var, y


def applies_bf16(x) -> bool:
    """bf16 NHWC activations under a mixed policy (mixed.py)."""
    return x.dtype == tf.bfloat16 and x.shape.rank == 4


def batch_norm_train_bf16(x, gamma, beta, epsilon: float):
    """The fused kernel on a bf16 x with float32 scale and offset: it accumulates in float32 and
    rounds its output to bf16 once, as torch's kernel does with a bf16 input (no shift: torch
    accumulates a bf16 input in float32 directly, and x - shift would round to bf16 again)."""
    return _fused(x, gamma, beta, epsilon)

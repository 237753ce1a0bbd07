"""Train-mode BatchNorm on TensorFlow by its fused kernels, for float32 and bf16 inputs.

The closed form in network._batch_norm_train accumulates its sums in float64, as torch's CPU
kernel does; on TensorFlow each float64 cast is a full copy of the activation, and those copies
made tlbridge's float32 MobileNetV2 step 1.28 x the time of keras.applications' (measured).
FusedBatchNormV3 and FusedBatchNormGradV3 (oneDNN's kernels where TensorFlow enables them,
Eigen's otherwise) compute the same closed form in one pass each, but their sums over N*H*W
run in one float32 stage: 2.5e-5 off in a variance on 32x32 images with repeated pixels, which
put Keras 40x further than torch from a float64 run of the demo (docs/parity.md, "float32
BatchNorm statistics"). So float32 keeps the kernels for the elementwise work and brings its
own statistics: staged float32 sums (_sum) of x minus its mean (no large mean left to cancel,
tests/test_batchnorm_backward.py offset30), the forward kernel in inference mode on them, the
gradient kernel in training mode for dx, and staged sums for d gamma and d beta.
"""
from __future__ import annotations

import tensorflow as tf


def applies(x) -> bool:
    """float32 NHWC activations (BatchNorm2d); float64 and half precision keep the closed form."""
    return x.dtype == tf.float32 and x.shape.rank == 4


def batch_norm_train(x, gamma, beta, epsilon: float):
    """(batch mean, unbiased batch variance, output) of a float32 NHWC x; the unbiased variance
    is what torch's running variance stores (docs/parity.md #2).

    The statistics are ours, summed in stages (_sum); the kernel normalises with them in
    inference mode, and its training-mode gradient kernel takes them as its saved statistics."""
    n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)     # the batch may be None
    shift = tf.stop_gradient(_sum(x) / n)
    r = x - shift
    r_const = tf.stop_gradient(r)
    mean_r = _sum(r_const) / n
    var = tf.maximum(_sum(tf.square(r_const)) / n - tf.square(mean_r), 0.0)   # biased
    y = _normalize(r, gamma, beta, mean_r, var, epsilon)
    return shift + mean_r, var * (n / tf.maximum(n - 1.0, 1.0)), y


def _sum(t):
    """Per-channel sum of an NHWC float32 tensor, over W, then H, then N: the kernels add a
    reduced axis term by term, and over N*H*W terms at once their float32 rounding adds up (a
    2.5e-5 relative variance error measured on 32x32 digit images, whose repeated pixels round
    the same way every time; torch sums in float64). Each stage adds at most max(N, H, W) terms."""
    return tf.reduce_sum(tf.reduce_sum(tf.reduce_sum(t, axis=2), axis=1), axis=0)


def _normalize(r, gamma, beta, mean, var, epsilon: float):
    """FusedBatchNormV3 normalising r with the given batch statistics; dx is FusedBatchNormGradV3's
    training-mode gradient (the statistics' own terms included), d gamma and d beta staged sums
    (torch sums them in float64: one-stage float32 sums were 30x its error on 32x32 images)."""
    mean, var = tf.stop_gradient(mean), tf.stop_gradient(var)

    @tf.custom_gradient
    def normalize(r, gamma, beta):
        y = tf.raw_ops.FusedBatchNormV3(
            x=r, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=epsilon,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=False)[0]

        def grad(dy):
            dx = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=r, scale=gamma, reserve_space_1=mean, reserve_space_2=var,
                reserve_space_3=tf.constant([], tf.float32), epsilon=epsilon,
                data_format="NHWC", is_training=True)[0]
            dbeta = _sum(dy)        # the kernel's own sums of dy and dy * x_hat are one-stage
            dgamma = (_sum(dy * r) - mean * dbeta) * tf.math.rsqrt(var + epsilon)
            return dx, dgamma, dbeta

        return y, grad

    return normalize(r, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


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

"""bf16 convolutions on TensorFlow whose weight gradient is one matmul
(docs/devices-and-data-parallel.md, "Mixed precision on the CPU").

Measured on a CPU with AMX (oneDNN 3.7 in TensorFlow 2.21, ResNet-50 at 64x64, batch 32):
oneDNN's bf16 backward-weights kernel (brgconv_bwd_w) ran no faster than the fp32 one and took
40% of the bf16 step; forward and backward-data kernels ran 3-6x faster than fp32. The weight
gradient of a 'valid' convolution is patches(x)^T @ dy, a matmul that runs on AMX at matmul
speed. Used where it wins (kernel 1x1, or few output positions, where the patches are cheap to
gather); the forward pass and the input gradient stay TensorFlow's own convolution kernels.
"""
from __future__ import annotations

import tensorflow as tf

SMALL_OUTPUT = 16       # output positions per image up to which a kxk kernel takes the matmul


def applies(x, kernel, strides, padding, dilation) -> bool:
    """Whether conv2d() takes the matmul weight gradient for this call (static shapes only)."""
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    h, w = x.shape[1], x.shape[2]
    if padding != "valid" or tuple(dilation) != (1, 1) or strides[0] != strides[1] \
            or h is None or w is None:
        return False
    s = int(strides[0])
    positions = ((h - kh) // s + 1) * ((w - kw) // s + 1)
    return (kh == kw == 1) or positions <= SMALL_OUTPUT


def pad_same(x, kernel):
    """x zero-padded as a stride-1 'same' convolution pads it (network.same_as_torch)."""
    ph, pw = (int(kernel.shape[0]) - 1) // 2, (int(kernel.shape[1]) - 1) // 2
    return tf.pad(x, [[0, 0], [ph, ph], [pw, pw], [0, 0]]) if ph or pw else x


def _patches(x, kh, kw, s, oh, ow):
    """im2col of a 'valid' convolution: (N, oh, ow, kh*kw*C), in the kernel's (i, j, c) order."""
    if kh == kw == 1:
        return x[:, ::s, ::s, :] if s > 1 else x
    return tf.concat([x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :]
                      for i in range(kh) for j in range(kw)], axis=-1)


def conv2d(x, kernel, stride: int):
    """A 'valid' NHWC convolution: TensorFlow's forward and input gradient, the kernel's
    gradient as one matmul over the patches."""
    kh, kw, c, o = (int(d) for d in kernel.shape)
    oh, ow = (int(x.shape[1]) - kh) // stride + 1, (int(x.shape[2]) - kw) // stride + 1
    strides = [1, stride, stride, 1]

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                                out_backprop=dy, strides=strides, padding="VALID")
            cols = tf.reshape(_patches(x, kh, kw, stride, oh, ow), (-1, kh * kw * c))
            dk = tf.matmul(cols, tf.reshape(dy, (-1, o)), transpose_a=True)
            return dx, tf.reshape(dk, (kh, kw, c, o))
        return tf.nn.conv2d(x, kernel, strides, "VALID"), grad

    return conv(x, kernel)

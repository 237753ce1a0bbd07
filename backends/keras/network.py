"""Keras layers that mirror torch modules exactly, and the builder that records canonical names.

`Mirror` creates each weight-carrying layer under its canonical (torch) module path and
remembers its kind, so `weights.py` can translate layouts (docs/parity.md #9) without guessing.
"""
from __future__ import annotations

import numpy as np
import keras
from keras import layers, ops

from tlbridge.errors import UnsupportedLayerError
from tlbridge.specs import HeadSpec

from . import engine, lora


def mean(x, axis, keepdims=False):
    """ops.mean on TensorFlow; sum / count elsewhere: Keras 3.15.1 computes the mean of a
    float64 tensor in float32 on the other engines (keras-team/keras#23223)."""
    if engine.TENSORFLOW:
        return ops.mean(x, axis=axis, keepdims=keepdims)
    axes = [axis] if isinstance(axis, int) else list(axis)
    count = int(np.prod([x.shape[a] for a in axes]))
    return ops.sum(x, axis=axis, keepdims=keepdims) / count


def _batch_norm_train(x, gamma, beta, epsilon, acc="float64"):
    """Train-mode BatchNorm with PyTorch's closed-form backward: (batch mean, biased batch
    variance, output).

    Autodiff through mean and variance sums three terms that cancel, and in float32 left
    Keras gradients ~50x further from the float64 truth than torch's (measured on
    MobileNetV2). torch's CPU kernel (aten/src/ATen/native/Normalization.cpp) instead uses
        dbeta = sum(dy),  dgamma = sum(dy * (x - mean)) * invstd,
        dx = (dy - sum(dy)/n - (x - mean) * dgamma * invstd / n) * invstd * gamma,
    accumulating the sums (and the statistics) in float64 on the CPU; so do we for float64
    (float32 on TensorFlow runs the fused kernels instead: fused_bn.py; on JAX it sums in float32:
    TorchBatchNorm.accumulator). Mixed precision passes acc="float32": the inputs were rounded
    to bf16/fp16, and the float64 sums cost a fifth of a bf16 step on the CPU (docs/devices-and-data-parallel.md).
    """
    axes = list(range(len(x.shape) - 1))

    def reduce_mean(t):
        if engine.TENSORFLOW:
            return ops.cast(ops.mean(ops.cast(t, acc), axis=axes), t.dtype)
        n = ops.cast(ops.prod(ops.shape(t)[:-1]), acc)
        return ops.cast(ops.sum(ops.cast(t, acc), axis=axes) / n, t.dtype)

    def reduce_sum(t):
        return ops.cast(ops.sum(ops.cast(t, acc), axis=axes), t.dtype)

    x_const = ops.stop_gradient(x)      # the statistics' own gradient is in the closed form
    mean = reduce_mean(x_const)
    var = reduce_mean(ops.square(x_const - mean))
    invstd = ops.rsqrt(var + epsilon)

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        xc = x - mean
        y = xc * (invstd * gamma) + beta

        def grad(*args, upstream=None):     # TF passes dy; JAX passes upstream=dy
            dy = args[0] if upstream is None else upstream
            n = ops.cast(ops.prod(ops.shape(x)[:-1]), x.dtype)
            dbeta = reduce_sum(dy)
            dotp = reduce_sum(dy * xc)
            k = dotp * invstd * invstd / n
            dx = (dy - dbeta / n - xc * k) * (invstd * gamma)
            return dx, dotp * invstd, dbeta

        return y, grad

    return mean, var, normalize(x, gamma, beta)


@keras.saving.register_keras_serializable("tlbridge")
class TorchBatchNorm(layers.Layer):
    """BatchNorm with PyTorch semantics (docs/parity.md #1-#4).

    momentum is torch's (new = (1-m)*old + m*batch); the running variance stores the
    unbiased batch variance while normalisation uses the biased one; a frozen layer
    (trainable=False or gamma frozen) always runs on its moving statistics.
    """

    def __init__(self, epsilon=1e-5, momentum=0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.accumulate = "float64"     # mixed.mixed_policy: float32 while a step is traced

    def build(self, input_shape):
        c = (int(input_shape[-1]),)
        # float32 under a mixed policy too (autocast=False), as in keras' BatchNormalization
        self.gamma = self.add_weight(shape=c, initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=c, initializer="zeros", name="beta", autocast=False)
        # under a tf.distribute strategy's scope (keras.fit on several replicas), the first
        # replica's update is kept: torch DDP's rank-0 buffers, and tlbridge's replicas= rule
        self.moving_mean = self.add_weight(shape=c, initializer="zeros", name="moving_mean",
                                           trainable=False, aggregation="only_first_replica",
                                           autocast=False)
        self.moving_variance = self.add_weight(shape=c, initializer="ones",
                                               name="moving_variance", trainable=False,
                                               aggregation="only_first_replica", autocast=False)

    def call(self, x, training=None):
        """Under a mixed policy (TensorFlow's bf16 steps, mixed.py) x is bf16: statistics and
        normalisation run in float32 and the output is rounded to bf16 once, as in keras'
        BatchNormalization. The fused kernel does that itself; other paths cast around."""
        train = training and self.trainable and self.gamma.trainable
        dtype = keras.backend.standardize_dtype(x.dtype)
        low = dtype if dtype in ("bfloat16", "float16") else None
        if low is not None and train and engine.TENSORFLOW and engine.replica_context() is None:
            return self._update(*self._train_pass(x))       # bf16 in, bf16 out, fused
        y = self._float_call(x if low is None else ops.cast(x, "float32"), train)
        return y if low is None else ops.cast(y, low)

    def _float_call(self, x, train):
        if train:
            ctx = engine.replica_context()
            if ctx is not None:     # replicas (parallel.py on TensorFlow, parallel_jax.py)
                return engine.batch_norm_in_replica(self, x, ctx, _batch_norm_train)
            return self._update(*self._train_pass(x))
        mean, var = self.moving_mean, self.moving_variance
        return (x - mean) * ops.rsqrt(var + self.epsilon) * self.gamma + self.beta

    def _update(self, mean, unbiased, y):
        m = self.momentum
        self.moving_mean.assign((1.0 - m) * self.moving_mean + m * mean)
        self.moving_variance.assign((1.0 - m) * self.moving_variance + m * unbiased)
        return y

    def _train_pass(self, x):
        """(batch mean, unbiased batch variance, output): TensorFlow's fused kernel for float32
        and bf16 (fused_bn.py), the closed form accumulating in self.accumulate otherwise."""
        if engine.TENSORFLOW:
            from . import fused_bn
            if fused_bn.applies_bf16(x):
                return fused_bn.batch_norm_train_bf16(x, self.gamma, self.beta, self.epsilon)
            if fused_bn.applies(x):
                return fused_bn.batch_norm_train(x, self.gamma, self.beta, self.epsilon)
        mean, var, y = _batch_norm_train(x, ops.copy(self.gamma.value), ops.copy(self.beta.value),
                                         self.epsilon, self.accumulator(x))
        n = ops.cast(ops.prod(ops.shape(x)[:-1]), x.dtype)
        return mean, var * (n / ops.maximum(n - 1.0, 1.0)), y

    def accumulator(self, x) -> str:
        """float32 sums for float32 on JAX: XLA's reductions are not one float32 stage (a
        variance 1.5e-7 off on repeated pixels, where TensorFlow's kernels were 3e-5 off:
        fused_bn.py), and float64 ones cost 4% of a MobileNetV2 step (docs/speed.md)."""
        if not engine.TENSORFLOW and keras.backend.standardize_dtype(x.dtype) == "float32":
            return "float32"
        return self.accumulate

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "momentum": self.momentum}


@keras.saving.register_keras_serializable("tlbridge")
class TorchLayerNorm(layers.Layer):
    """nn.LayerNorm over the last axis (torchvision's LayerNorm2d is this on NHWC):
    biased variance, eps inside the square root, per-channel weight and bias."""

    def __init__(self, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        c = (int(input_shape[-1]),)
        self.gamma = self.add_weight(shape=c, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=c, initializer="zeros", name="beta")

    def call(self, x):
        if engine.TENSORFLOW:
            mu = ops.mean(x, axis=-1, keepdims=True)
            var = ops.var(x, axis=-1, keepdims=True)
        else:       # sum / count: Keras' mean and var round float64 through float32 there
            mu = mean(x, -1, keepdims=True)
            var = mean(ops.square(x - mu), -1, keepdims=True)
        return (x - mu) * ops.rsqrt(var + self.epsilon) * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable("tlbridge")
class TorchGELU(layers.Layer):
    """nn.GELU(): x * 0.5 * (1 + erf(x / sqrt(2))), written out as torch does. TensorFlow's own
    tf.nn.gelu(approximate=False) is off by ~5e-9 in float64 (measured), above the parity bar."""

    def call(self, x):
        return x * 0.5 * (1.0 + ops.erf(x * 0.7071067811865476))


@keras.saving.register_keras_serializable("tlbridge")
class Tanh(layers.Layer):
    """tanh through expm1, for the engines where Keras 3.15.1's ops.tanh computes float64 in
    float32 (its result_type, keras-team/keras#23223): sign(x) * -e / (2 + e), e = expm1(-2|x|)."""

    def call(self, x):
        e = ops.expm1(-2.0 * ops.abs(x))
        return ops.sign(x) * (-e / (2.0 + e))


@keras.saving.register_keras_serializable("tlbridge")
class LayerScale(layers.Layer):
    """A per-channel scale parameter (ConvNeXt's `layer_scale`, torch shape (C, 1, 1))."""

    def __init__(self, init_value=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(int(input_shape[-1]),),
                                     initializer=keras.initializers.Constant(self.init_value),
                                     name="gamma")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable("tlbridge")
class StochasticDepth(layers.Layer):
    """torchvision.ops.StochasticDepth(p, "row"): in training, zero whole samples with
    probability p and scale the survivors by 1/(1-p); identity otherwise.

    Its random mask is drawn by Keras, not shared with PyTorch, so a train-mode pass
    with p > 0 is *not* reproduced across backends (the portable default is p = 0).
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed
        if self.rate > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate <= 0.0:
            return x
        survival = 1.0 - self.rate
        shape = [ops.shape(x)[0]] + [1] * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, dtype=x.dtype, seed=self.seed_generator)
        mask = ops.floor(noise + survival)
        if survival > 0.0:
            mask = mask / survival
        return x * mask

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _bins(size: int, out: int) -> np.ndarray:
    """torch's AdaptiveAvgPool bins as an (out, size) averaging matrix."""
    mat = np.zeros((out, size))
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


@keras.saving.register_keras_serializable("tlbridge")
class AdaptiveAvgPool2D(layers.Layer):
    """torch.nn.AdaptiveAvgPool2d for NHWC with a static input size."""

    def __init__(self, output_size=(7, 7), **kwargs):
        super().__init__(**kwargs)
        self.output_size = tuple(output_size)

    def build(self, input_shape):
        self._ph = _bins(int(input_shape[1]), self.output_size[0])
        self._pw = _bins(int(input_shape[2]), self.output_size[1])

    def call(self, x):
        ph = ops.convert_to_tensor(self._ph, dtype=x.dtype)
        pw = ops.convert_to_tensor(self._pw, dtype=x.dtype)
        return ops.einsum("ih,jw,nhwc->nijc", ph, pw, x)

    def get_config(self):
        return {**super().get_config(), "output_size": self.output_size}


@keras.saving.register_keras_serializable("tlbridge")
class GlobalMean(layers.Layer):
    """GlobalAveragePooling2D as sum / (H * W), for the engines where Keras' own rounds float64
    through float32 (keras-team/keras#23223)."""

    def __init__(self, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.keepdims = bool(keepdims)

    def call(self, x):
        return mean(x, (1, 2), keepdims=self.keepdims)

    def get_config(self):
        return {**super().get_config(), "keepdims": self.keepdims}


def _pair(v) -> tuple | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(d, int) for d in v):
        return tuple(v)
    return None


def same_as_torch(kernel, padding) -> bool:
    """Whether a stride-1 conv's torch padding is Keras' 'same': non-zero, (k - 1) / 2 a side."""
    k, p = _pair(kernel), _pair(padding)
    return bool(k and p and any(p) and all(2 * pi == ki - 1 for ki, pi in zip(k, p)))


@keras.saving.register_keras_serializable("tlbridge")
class Conv2D(layers.Conv2D):
    """layers.Conv2D; in bf16 on TensorFlow its kernel gradient is a matmul where oneDNN's bf16
    backward-weights kernel is slow (convgrad.py). Every other dtype and engine: Keras' own."""

    def convolution_op(self, inputs, kernel):
        if engine.TENSORFLOW and self.compute_dtype == "bfloat16" and self.groups == 1:
            from . import convgrad
            x = convgrad.pad_same(inputs, kernel) if self.padding == "same" else inputs
            if convgrad.applies(x, kernel, self.strides, "valid" if self.padding == "same"
                                else self.padding, self.dilation_rate):
                return convgrad.conv2d(x, kernel, int(self.strides[0]))
        return super().convolution_op(inputs, kernel)


class Mirror:
    """Creates Keras layers that mirror torch modules, recording (canonical prefix, kind, layer)."""

    def __init__(self, dtype: str, scope: str = "", adapters=()):
        self.dtype = dtype
        self.scope = scope            # "backbone." for backbones, "" for the head
        self.entries: list[tuple[str, str, layers.Layer]] = []
        # LoRA (spec.adapters): canonical module name -> (rank, alpha, dropout); lora.adapt
        self.adapters = {name: (r, a, d) for name, r, a, d in adapters}

    def _record(self, prefix, kind, layer):
        self.entries.append((prefix, kind, layer))
        return layer

    def pad(self, x, padding):
        return layers.ZeroPadding2D(padding, dtype=self.dtype)(x) if padding else x

    def conv(self, x, prefix, filters, kernel, stride=1, padding=0, bias=True, groups=1):
        """nn.Conv2d. Stride 1 with padding (k - 1) / 2 is Keras' 'same': the same zeros on both
        sides, padded inside the kernel (no copy of x, none of its gradient). Otherwise explicit
        symmetric ZeroPadding2D + a 'valid' conv: a strided 'same' pads one side only where
        torch pads both (docs/parity.md #5)."""
        mode = "same" if stride == 1 and same_as_torch(kernel, padding) else "valid"
        if mode == "valid":
            x = self.pad(x, padding)
        in_ch = int(x.shape[-1])
        if groups == 1:
            layer = Conv2D(filters, kernel, strides=stride, padding=mode, use_bias=bias,
                           name=self.scope + prefix, dtype=self.dtype)
            kind = "conv"
        elif groups == in_ch == filters:
            layer = layers.DepthwiseConv2D(kernel, strides=stride, padding=mode, use_bias=bias,
                                           name=self.scope + prefix, dtype=self.dtype)
            kind = "depthwise"
        else:
            raise UnsupportedLayerError(
                f"Expected groups=1 or a depthwise conv (groups == in == out channels); received "
                f"groups={groups} (in {in_ch}, out {filters}). A grouped convolution has no Keras "
                f"mirror yet; use a portable backbone without grouped convs.")
        y = self._record(self.scope + prefix, kind, layer)(x)
        return lora.adapt(self, x, y, self.scope + prefix, layer)

    def bn(self, x, prefix, eps=1e-5, momentum=0.1):
        layer = TorchBatchNorm(eps, momentum, name=self.scope + prefix, dtype=self.dtype)
        return self._record(self.scope + prefix, "bn", layer)(x)

    def dense(self, x, prefix, units, bias=True):
        layer = layers.Dense(units, use_bias=bias, name=self.scope + prefix, dtype=self.dtype)
        y = self._record(self.scope + prefix, "dense", layer)(x)
        return lora.adapt(self, x, y, self.scope + prefix, layer)

    def act(self, x, name):
        if name == "tanh" and not engine.TENSORFLOW:
            return Tanh(dtype=self.dtype)(x)
        return layers.Activation(name, dtype=self.dtype)(x)

    def relu(self, x):
        return layers.ReLU(dtype=self.dtype)(x)

    def relu6(self, x):
        return layers.ReLU(max_value=6.0, dtype=self.dtype)(x)

    def gelu(self, x):
        """nn.GELU(): the exact erf form, not the tanh approximation."""
        return TorchGELU(dtype=self.dtype)(x)

    def layernorm(self, x, prefix, eps=1e-5):
        """nn.LayerNorm(C) on channels-last input (also torchvision's LayerNorm2d on NHWC)."""
        layer = TorchLayerNorm(eps, name=self.scope + prefix, dtype=self.dtype)
        return self._record(self.scope + prefix, "layernorm", layer)(x)

    def layer_scale(self, prefix, init_value=1e-6):
        """The layer multiplying by the parameter `{prefix}.layer_scale` (torch (C, 1, 1), Keras
        (C,)). Returned unapplied: create it where torch registers it, so the canonical order
        matches the state_dict (a module's own parameters come before its children's)."""
        layer = LayerScale(init_value, name=self.scope + prefix + ".layer_scale", dtype=self.dtype)
        return self._record(self.scope + prefix, "layer_scale", layer)

    def stochastic_depth(self, x, rate):
        """torchvision StochasticDepth(rate, "row"); nothing at all is added when rate == 0."""
        return StochasticDepth(rate, dtype=self.dtype)(x) if rate > 0 else x

    def squeeze_excitation(self, x, prefix, squeeze, activation="silu"):
        """torchvision.ops.SqueezeExcitation: x * sigmoid(fc2(act(fc1(avgpool(x)))))."""
        s = self.global_avgpool(x, keepdims=True)
        s = self.act(self.conv(s, f"{prefix}.fc1", squeeze, 1), activation)
        s = self.act(self.conv(s, f"{prefix}.fc2", int(x.shape[-1]), 1), "sigmoid")
        return self.multiply(s, x)

    def maxpool(self, x, size, stride, padding=0):
        """nn.MaxPool2d; zero padding equals torch's -inf padding only after a ReLU (inputs >= 0)."""
        x = self.pad(x, padding)
        return layers.MaxPooling2D(size, strides=stride, padding="valid", dtype=self.dtype)(x)

    def global_avgpool(self, x, keepdims=False):
        if engine.TENSORFLOW:
            return layers.GlobalAveragePooling2D(keepdims=keepdims, dtype=self.dtype)(x)
        return GlobalMean(keepdims, dtype=self.dtype)(x)

    def adaptive_avgpool(self, x, size):
        return AdaptiveAvgPool2D(size, dtype=self.dtype)(x)

    def flatten_chw(self, x):
        """torch.flatten of an NCHW tensor: channel-major order (docs/parity.md #10)."""
        x = layers.Permute((3, 1, 2), dtype=self.dtype)(x)
        return layers.Flatten(dtype=self.dtype)(x)

    def add(self, a, b):
        return layers.Add(dtype=self.dtype)([a, b])

    def embedding(self, ids, prefix, vocab_size, dim):
        """nn.Embedding: the same (vocab, dim) table in both layouts."""
        layer = layers.Embedding(int(vocab_size), int(dim), name=self.scope + prefix,
                                 dtype=self.dtype)
        return self._record(self.scope + prefix, "embedding", layer)(ids)

    def masked_mean(self, x, mask):
        return MaskedMean(dtype=self.dtype)(x, mask)

    def multiply(self, a, b):
        return layers.Multiply(dtype=self.dtype)([a, b])


@keras.saving.register_keras_serializable("tlbridge")
class MaskedMean(layers.Layer):
    """The mean of (N, L, D) over the positions whose mask is 1, written as sum / count (a
    Keras mean would round float64 through float32 on other engines: docs/parity.md)."""

    def call(self, x, mask):
        m = ops.expand_dims(ops.cast(mask, x.dtype), -1)
        return ops.sum(x * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)


@keras.saving.register_keras_serializable("tlbridge")
class TaskLogVars(layers.Layer):
    """Holds a multi-task head's log-variances s_t (canonical `task_log_vars`, zeros at the
    start); the loss reads them, no forward pass does."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = int(tasks)

    def build(self, input_shape=None):
        self.log_vars = self.add_weight(shape=(self.tasks,), initializer="zeros",
                                        name="task_log_vars")

    def get_config(self):
        return {**super().get_config(), "tasks": self.tasks}


def make_head(mirror: Mirror, feats, spec: HeadSpec, prefix: str = "head"):
    """Dense layers named like the torch head; dropout off in eval, torch's 1/(1-p) scaling."""
    x = feats
    names = spec.layer_names(prefix)
    units = [*spec.hidden, spec.num_outputs]
    for i, (name, n) in enumerate(zip(names, units)):
        if spec.dropout > 0 and (i > 0 or not spec.hidden):
            x = layers.Dropout(spec.dropout, dtype=mirror.dtype)(x)
        x = mirror.dense(x, name, n)
        if i < len(units) - 1:
            x = mirror.relu(x)
    return x

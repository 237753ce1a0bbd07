"""Mixed precision on every Keras engine: Keras' own mixed dtype policies, set on the layers
while a training step is traced (float32 variables, cast to bf16/fp16 on read)."""
from __future__ import annotations

import contextlib

import keras

from . import engine
from .network import TorchBatchNorm

POLICY = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# float32 under mixed precision: BatchNorm (as on torch) and, on TensorFlow, the depthwise
# convolution, whose bf16 input gradient took 10x its fp32 time on the CPU (MobileNetV2)
FLOAT32 = (TorchBatchNorm, keras.layers.BatchNormalization) + (
    (keras.layers.DepthwiseConv2D,) if engine.TENSORFLOW else ())
GROWTH_INTERVAL = 2000          # fp16 loss scaling: torch.amp.GradScaler's defaults
INITIAL_SCALE = 2.0 ** 16


def bf16_batch_norm(layer, precision: str) -> bool:
    """On TensorFlow in bf16, tlbridge's BatchNorm takes its bf16 input to the fused kernel
    (float32 statistics, the output rounded to bf16 once: network.TorchBatchNorm.call), which
    halved its time against a float32 BatchNorm between two casts."""
    return engine.TENSORFLOW and precision == "bf16" and isinstance(layer, TorchBatchNorm)


@contextlib.contextmanager
def mixed_policy(model, precision: str):
    """Every layer but FLOAT32's computes in bf16/fp16 (Keras' mixed policy: float32
    variables, cast on read) while a step is traced; BatchNorm and the loss stay float32,
    BatchNorm's sums accumulated in float32 (not float64: its inputs were rounded already)."""
    if precision == "fp32":
        yield
        return
    saved = [(layer, layer.dtype_policy) for layer in model._flatten_layers(include_self=True)]
    norms = [layer for layer, _ in saved if isinstance(layer, TorchBatchNorm)]
    try:
        for layer, _ in saved:
            if not isinstance(layer, FLOAT32) or bf16_batch_norm(layer, precision):
                layer.dtype_policy = POLICY[precision]
        for layer in norms:
            layer.accumulate = "float32"
        yield
    finally:
        for layer, policy in saved:
            layer.dtype_policy = policy
        for layer in norms:
            layer.accumulate = "float64"

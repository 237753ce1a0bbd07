"""torch runs a fine_tune's convolutions in channels_last (NHWC) memory where that layout is the
faster one: bf16 everywhere, fp32 on the CPU for nets with grouped or depthwise convolutions
(MobileNetV2 and EfficientNet-B0 1.33x, docs/speed.md). Those steps must compute the updates
the NCHW steps compute, within float32 rounding of the float64 truth, and leave the model in the
layout it came in, also when the run fails."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, learnable

import tlbridge as tl
from tlbridge import errors

SHAPE = (32, 32, 3)
pytestmark = pytest.mark.skipif("torch" not in BACKENDS, reason="torch is not installed")


def _model(name, dtype="float32"):
    return tl.replace_head(tl.load_backbone(name, backend="torch", input_shape=SHAPE, seed=0,
                                            dtype=dtype), 1, seed=1)


def _first_convolution_layouts(m):
    """(input, output) channels_last flags of the first convolution, one pair per forward."""
    import torch
    conv = next(mod for mod in m.native.modules() if isinstance(mod, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda mod, args, out: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last),
         out.is_contiguous(memory_format=torch.channels_last))))
    return seen


@pytest.mark.parametrize("name,dtype,expected", [
    ("mobilenet_v3_small", "float32", True),     # depthwise convolutions: channels_last
    ("efficientnet_b0", "float32", True),
    ("resnet18", "float32", False),              # plain convolutions: 0.83x there, so NCHW
    ("mobilenet_v3_small", "float64", False),    # the float64 truth keeps its layout
])
def test_fp32_steps_run_channels_last_where_the_net_has_grouped_convolutions(name, dtype,
                                                                             expected):
    x, y = learnable(8, 0, SHAPE)
    m = _model(name, dtype)
    seen = _first_convolution_layouts(m)
    tl.fine_tune(m, (x.astype(dtype), y.astype(dtype)), epochs=1, batch_size=8, progress=False,
                 feature_cache=False)
    assert seen == [(expected, expected)]
    assert all(p.is_contiguous() for p in m.native.parameters()), "the model must leave in NCHW"


def _updates(m, w0, x, y):
    tl.set_weights(m, {k: v.astype(m.dtype) for k, v in w0.items()})
    tl.fine_tune(m, (x.astype(m.dtype), y.astype(m.dtype)), epochs=1, batch_size=8,
                 progress=False, feature_cache=False)
    return {k: v.astype(np.float64) - w0[k] for k, v in tl.get_weights(m).items()
            if "num_batches" not in k}


def test_channels_last_fp32_updates_are_within_float32_rounding_of_the_float64_ones(monkeypatch):
    """Four SGD-momentum steps (BatchNorm in train mode) from the same weights: each tensor's
    update against float64's, relative to the larger of its own and 1e-3 x the model's
    largest update (BatchNorm biases before a BatchNorm have a true update of 0, so their
    float32 update is pure rounding). Measured on a 2-core x86: median 1.0e-4, worst 7.5e-4
    (NCHW 7.1e-5 and 4.1e-4). A layout mix-up (a transposed image, a restored kernel in the
    wrong order) is an error of order 1."""
    from tlbridge.backends.torch import training
    x, y = learnable(32, 0, SHAPE)
    w0 = tl.get_weights(_model("efficientnet_b0"))
    truth = _updates(_model("efficientnet_b0", "float64"), w0, x, y)
    big = max(np.abs(v).max() for v in truth.values())
    worst = {}
    for layout in ("channels_last", "nchw"):
        if layout == "nchw":
            monkeypatch.setattr(training, "grouped_convolutions", lambda net: False)
        m = _model("efficientnet_b0")
        seen = _first_convolution_layouts(m)
        got = _updates(m, w0, x, y)
        assert {flags[0] for flags in seen} == {layout == "channels_last"}
        err = {k: np.abs(got[k] - truth[k]).max() / max(np.abs(truth[k]).max(), 1e-3 * big)
               for k in truth}
        worst[layout] = max(err.values())
        assert np.median(list(err.values())) <= 1e-3, (layout, np.median(list(err.values())))
        assert worst[layout] <= 1e-2, (layout, max(err, key=err.get), worst[layout])


def test_a_diverged_channels_last_run_leaves_the_model_in_nchw():
    x, y = learnable(16, 0, SHAPE)
    m = _model("mobilenet_v3_small")
    seen = _first_convolution_layouts(m)
    explode = lambda step, total: 1.0 if step < 1 else 1e30  # noqa: E731
    with pytest.raises(errors.TrainingDivergedError):
        tl.fine_tune(m, (x.astype("float32"), y.astype("float32")), epochs=2, batch_size=8,
                     optimizer=tl.optim.SGD(0.05, schedule=explode), progress=False,
                     feature_cache=False)
    assert seen and all(flags == (True, True) for flags in seen)
    assert all(p.is_contiguous() for p in m.native.parameters())

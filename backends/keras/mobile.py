"""Keras mirrors of torchvision's mobile-era portables: mobilenet_v2, efficientnet_b0, convnext_tiny.

Same contract as `backbones.py`: (mirror, inputs, pretrained, **options) -> (N, D) features,
every weight layer created through `Mirror` under its torchvision module path.

Stochastic depth (efficientnet_b0, convnext_tiny): off by default on both backends
(`stochastic_depth_prob=0.0`), because parity needs it off: a train-mode pass with p > 0
drops rows at random, and matching torch would need a mask shared through numpy. With
p > 0 the eval-mode function still agrees; the train-mode one agrees only in distribution.
"""
from __future__ import annotations

from .network import Mirror


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision.models._utils._make_divisible (channel rounding of MobileNet/EfficientNet)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _cna(mirror: Mirror, x, prefix, filters, kernel=3, stride=1, groups=1, act="relu6",
         eps=1e-5, momentum=0.1):
    """torchvision.ops.Conv2dNormActivation: conv (padding (k-1)//2, no bias), BN, activation."""
    x = mirror.conv(x, f"{prefix}.0", filters, kernel, stride, (kernel - 1) // 2, bias=False,
                    groups=groups)
    x = mirror.bn(x, f"{prefix}.1", eps, momentum)
    if act == "relu6":
        return mirror.relu6(x)
    return mirror.act(x, act) if act else x


# ---------------------------------------------------------------- MobileNetV2

MOBILENET_V2_CFG = [  # expand ratio t, channels c, repeats n, first stride s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def _inverted_residual(mirror: Mirror, x, p, out_ch, stride, expand_ratio):
    """torchvision.models.mobilenetv2.InvertedResidual (modules under `{p}.conv`)."""
    in_ch = int(x.shape[-1])
    hidden = int(round(in_ch * expand_ratio))
    out, i = x, 0
    if expand_ratio != 1:
        out = _cna(mirror, out, f"{p}.conv.{i}", hidden, kernel=1)
        i += 1
    out = _cna(mirror, out, f"{p}.conv.{i}", hidden, 3, stride, groups=hidden)
    out = mirror.conv(out, f"{p}.conv.{i + 1}", out_ch, 1, bias=False)
    out = mirror.bn(out, f"{p}.conv.{i + 2}")
    if stride == 1 and in_ch == out_ch:
        return mirror.add(x, out)
    return out


def mobilenet_v2(mirror: Mirror, x, pretrained: bool):
    """torchvision mobilenet_v2 (width 1.0): features, global average pool (1280 features)."""
    x = _cna(mirror, x, "features.0", 32, 3, 2)
    idx = 1
    for t, c, n, s in MOBILENET_V2_CFG:
        for i in range(n):
            x = _inverted_residual(mirror, x, f"features.{idx}", c, s if i == 0 else 1, t)
            idx += 1
    x = _cna(mirror, x, f"features.{idx}", 1280, kernel=1)
    return mirror.global_avgpool(x)


# ---------------------------------------------------------------- EfficientNet-B0

EFFICIENTNET_B0_CFG = [  # expand ratio, kernel, first stride, in channels, out channels, layers
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
]


def _mbconv(mirror: Mirror, x, p, expand_ratio, kernel, stride, out_ch, sd_prob):
    """torchvision.models.efficientnet.MBConv: [expand], depthwise, SE, project (under `{p}.block`)."""
    in_ch = int(x.shape[-1])
    expanded = _make_divisible(in_ch * expand_ratio)
    out, i = x, 0
    if expanded != in_ch:
        out = _cna(mirror, out, f"{p}.block.{i}", expanded, kernel=1, act="silu")
        i += 1
    out = _cna(mirror, out, f"{p}.block.{i}", expanded, kernel, stride, groups=expanded, act="silu")
    out = mirror.squeeze_excitation(out, f"{p}.block.{i + 1}", max(1, in_ch // 4), "silu")
    out = _cna(mirror, out, f"{p}.block.{i + 2}", out_ch, kernel=1, act=None)
    if stride == 1 and in_ch == out_ch:
        return mirror.add(mirror.stochastic_depth(out, sd_prob), x)
    return out


def efficientnet_b0(mirror: Mirror, x, pretrained: bool, stochastic_depth_prob=0.0):
    """torchvision efficientnet_b0: features, global average pool (1280 features).

    BatchNorm is torch's default (eps 1e-5, momentum 0.1): torchvision only passes
    eps=1e-3 for B5-B7 and the V2 family. Block j of J gets stochastic depth p * j / J.
    """
    x = _cna(mirror, x, "features.0", 32, 3, 2, act="silu")
    total = sum(cfg[-1] for cfg in EFFICIENTNET_B0_CFG)
    block_id = 0
    for stage, (t, k, s, _, c, n) in enumerate(EFFICIENTNET_B0_CFG, start=1):
        for i in range(n):
            sd = float(stochastic_depth_prob) * float(block_id) / total
            x = _mbconv(mirror, x, f"features.{stage}.{i}", t, k, s if i == 0 else 1, c, sd)
            block_id += 1
    x = _cna(mirror, x, f"features.{len(EFFICIENTNET_B0_CFG) + 1}", 1280, kernel=1, act="silu")
    return mirror.global_avgpool(x)


# ---------------------------------------------------------------- ConvNeXt-Tiny

CONVNEXT_TINY_CFG = [(96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)]


def _cnblock(mirror: Mirror, x, p, sd_prob):
    """torchvision.models.convnext.CNBlock. Its Linear layers act on channels-last tensors
    (the Permutes), which in NHWC is a Dense on the last axis."""
    dim = int(x.shape[-1])
    scale = mirror.layer_scale(p)  # CNBlock's own parameter: first in its state_dict
    out = mirror.conv(x, f"{p}.block.0", dim, 7, 1, 3, groups=dim)
    out = mirror.layernorm(out, f"{p}.block.2", eps=1e-6)
    out = mirror.gelu(mirror.dense(out, f"{p}.block.3", 4 * dim))
    out = mirror.dense(out, f"{p}.block.5", dim)
    out = mirror.stochastic_depth(scale(out), sd_prob)
    return mirror.add(out, x)


def convnext_tiny(mirror: Mirror, x, pretrained: bool, stochastic_depth_prob=0.0):
    """torchvision convnext_tiny: features, global average pool, then the classifier's
    LayerNorm2d + Flatten (only its final Linear is dropped): 768 features.
    Block j of J gets stochastic depth p * j / (J - 1)."""
    x = mirror.conv(x, "features.0.0", 96, 4, 4)
    x = mirror.layernorm(x, "features.0.1", eps=1e-6)
    total = sum(n for _, _, n in CONVNEXT_TINY_CFG)
    block_id, idx = 0, 1
    for dim, out_dim, n in CONVNEXT_TINY_CFG:
        for i in range(n):
            sd = float(stochastic_depth_prob) * block_id / (total - 1.0)
            x = _cnblock(mirror, x, f"features.{idx}.{i}", sd)
            block_id += 1
        idx += 1
        if out_dim is not None:
            x = mirror.layernorm(x, f"features.{idx}.0", eps=1e-6)
            x = mirror.conv(x, f"features.{idx}.1", out_dim, 2, 2)
            idx += 1
    x = mirror.global_avgpool(x)
    return mirror.layernorm(x, "classifier.0", eps=1e-6)


PORTABLE = {"mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0,
            "convnext_tiny": convnext_tiny}

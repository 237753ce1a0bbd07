"""Backbones on Keras: tlbridge's exact mirrors of the torchvision portables, and keras.applications.

Each mirror takes (mirror, inputs, **options) and returns the (N, D) feature tensor;
every weight layer is named by its torchvision module path.
"""
from __future__ import annotations

import keras

from tlbridge.errors import NoPretrainedWeightsError

from . import bert, mobile
from .network import Mirror

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg_features(mirror: Mirror, x, cfg, batch_norm: bool, prefix="features"):
    """torchvision.models.vgg.make_layers: conv(pad 1)[, BN], ReLU per int; MaxPool2d(2) per 'M'."""
    idx = 0
    for item in cfg:
        if item == "M":
            x = mirror.maxpool(x, 2, 2)
            idx += 1
            continue
        x = mirror.conv(x, f"{prefix}.{idx}", int(item), 3, padding=1)
        if batch_norm:
            x = mirror.bn(x, f"{prefix}.{idx + 1}")
            idx += 1
        x = mirror.relu(x)
        idx += 2
    return x


def seed_vgg(mirror: Mirror, x, pretrained: bool, widths=(16, 32, 64), batch_norm=False):
    if pretrained:
        raise NoPretrainedWeightsError("Expected weights=None or a file path for seed_vgg, which "
                                       "has no pretrained weights; received weights='imagenet'.")
    cfg = []
    for width in widths:
        cfg += [int(width), "M"]
    return mirror.flatten_chw(_vgg_features(mirror, x, cfg, batch_norm))


def vgg16(mirror: Mirror, x, pretrained: bool):
    x = _vgg_features(mirror, x, VGG16_CFG, batch_norm=False)
    return mirror.flatten_chw(mirror.adaptive_avgpool(x, (7, 7)))


def _basic_block(mirror, x, p, width, stride):
    identity = x
    out = mirror.relu(mirror.bn(mirror.conv(x, f"{p}.conv1", width, 3, stride, 1, bias=False), f"{p}.bn1"))
    out = mirror.bn(mirror.conv(out, f"{p}.conv2", width, 3, 1, 1, bias=False), f"{p}.bn2")
    if stride != 1 or int(x.shape[-1]) != width:
        identity = mirror.bn(mirror.conv(x, f"{p}.downsample.0", width, 1, stride, bias=False),
                             f"{p}.downsample.1")
    return mirror.relu(mirror.add(out, identity))


def _bottleneck(mirror, x, p, width, stride):
    """torchvision's ResNet v1.5 bottleneck: the stride sits in the 3x3 conv."""
    identity = x
    out = mirror.relu(mirror.bn(mirror.conv(x, f"{p}.conv1", width, 1, bias=False), f"{p}.bn1"))
    out = mirror.relu(mirror.bn(mirror.conv(out, f"{p}.conv2", width, 3, stride, 1, bias=False), f"{p}.bn2"))
    out = mirror.bn(mirror.conv(out, f"{p}.conv3", width * 4, 1, bias=False), f"{p}.bn3")
    if stride != 1 or int(x.shape[-1]) != width * 4:
        identity = mirror.bn(mirror.conv(x, f"{p}.downsample.0", width * 4, 1, stride, bias=False),
                             f"{p}.downsample.1")
    return mirror.relu(mirror.add(out, identity))


def _resnet(mirror: Mirror, x, block, depths):
    x = mirror.relu(mirror.bn(mirror.conv(x, "conv1", 64, 7, 2, 3, bias=False), "bn1"))
    x = mirror.maxpool(x, 3, 2, padding=1)  # follows a ReLU, so zero padding == -inf padding
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for i in range(depth):
            stride = 2 if (i == 0 and stage > 1) else 1
            x = block(mirror, x, f"layer{stage}.{i}", width, stride)
    return mirror.global_avgpool(x)


def resnet18(mirror: Mirror, x, pretrained: bool):
    return _resnet(mirror, x, _basic_block, (2, 2, 2, 2))


def resnet50(mirror: Mirror, x, pretrained: bool):
    return _resnet(mirror, x, _bottleneck, (3, 4, 6, 3))


def token_bag(mirror: Mirror, x, pretrained: bool, vocab_size=1000, dim=64):
    """backends/torch/backbones.py TokenBag: embeddings, masked mean, Linear + tanh; x is the
    dict of keras.Input {"input_ids", "attention_mask"}."""
    e = mirror.embedding(x["input_ids"], "embeddings", vocab_size, dim)
    pooled = mirror.masked_mean(e, x["attention_mask"])
    return mirror.act(mirror.dense(pooled, "dense", int(dim)), "tanh")


PORTABLE = {"seed_vgg": seed_vgg, "vgg16": vgg16, "resnet18": resnet18, "resnet50": resnet50,
            "token_bag": token_bag, "bert": bert.bert, "minilm_l6": bert.bert, **mobile.PORTABLE}


def native_names() -> list[str]:
    apps = keras.applications
    return sorted(n for n in dir(apps) if n[:1].isupper() and callable(getattr(apps, n)))


def build_native(name: str, pretrained: bool, input_shape, options: dict) -> keras.Model:
    """A keras.applications model without its top, globally average-pooled to (N, D)."""
    fn = getattr(keras.applications, name)
    kwargs = {"include_top": False, "weights": "imagenet" if pretrained else None,
              "input_shape": tuple(input_shape), "pooling": "avg", **options}
    return fn(**kwargs)

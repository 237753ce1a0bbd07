"""Backbones on PyTorch: portable ones from torchvision's constructors, and the native catalog.

Every builder returns an nn.Module mapping NCHW images to (N, D) features: the
torchvision model with its classifier replaced by nn.Identity, so torchvision
checkpoints (minus the classifier) load unchanged.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import vgg as tv_vgg

from tlbridge.errors import NoPretrainedWeightsError, UnsupportedLayerError

from . import bert


class SeedVGG(nn.Module):
    """conv3x3 + (BN) + ReLU + maxpool2x2 per width, then a channel-major flatten."""

    def __init__(self, widths=(16, 32, 64), batch_norm=False):
        super().__init__()
        cfg = []
        for width in widths:
            cfg += [int(width), "M"]
        self.features = tv_vgg.make_layers(cfg, batch_norm=bool(batch_norm))

    def forward(self, x):
        return torch.flatten(self.features(x), 1)


def _tv_weights(name: str, pretrained: bool):
    return torchvision.models.get_model_weights(name).DEFAULT if pretrained else None


def _strip(model: nn.Module, attr: str) -> nn.Module:
    setattr(model, attr, nn.Identity())
    return model


def _seed_vgg(pretrained: bool, widths=(16, 32, 64), batch_norm=False):
    if pretrained:
        raise NoPretrainedWeightsError("Expected weights=None or a file path for seed_vgg, which "
                                       "has no pretrained weights; received weights='imagenet'.")
    return SeedVGG(widths, batch_norm)


def _mobilenet_v2(pretrained: bool):
    return _strip(torchvision.models.mobilenet_v2(weights=_tv_weights("mobilenet_v2", pretrained)),
                  "classifier")


def _efficientnet_b0(pretrained: bool, stochastic_depth_prob=0.0):
    """torchvision efficientnet_b0 with stochastic depth off by default (torchvision: 0.2).

    Parity needs it off: train-mode stochastic depth drops rows at random, and matching the
    Keras mirror would need a mask shared through numpy. Eval mode is unaffected either way.
    """
    model = torchvision.models.efficientnet_b0(weights=_tv_weights("efficientnet_b0", pretrained),
                                               stochastic_depth_prob=float(stochastic_depth_prob))
    return _strip(model, "classifier")


def _convnext_tiny(pretrained: bool, stochastic_depth_prob=0.0):
    """torchvision convnext_tiny with stochastic depth off by default (torchvision: 0.1), for
    the reason given in `_efficientnet_b0`. The classifier's LayerNorm2d and Flatten stay
    part of the backbone; only its final Linear becomes Identity (768 features)."""
    model = torchvision.models.convnext_tiny(weights=_tv_weights("convnext_tiny", pretrained),
                                             stochastic_depth_prob=float(stochastic_depth_prob))
    model.classifier[2] = nn.Identity()
    return model


class TokenBag(nn.Module):
    """tlbridge's two-input text encoder (tlbridge/zoo.py "token_bag"): token embeddings, their
    mean over the attention mask, Linear + tanh. Takes {"input_ids", "attention_mask"}."""

    def __init__(self, vocab_size=1000, dim=64):
        super().__init__()
        self.embeddings = nn.Embedding(int(vocab_size), int(dim))
        self.dense = nn.Linear(int(dim), int(dim))

    def forward(self, inputs: dict):
        e = self.embeddings(inputs["input_ids"])
        mask = inputs["attention_mask"].to(e.dtype).unsqueeze(-1)
        pooled = (e * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.tanh(self.dense(pooled))


def _token_bag(pretrained: bool, vocab_size=1000, dim=64):
    return TokenBag(vocab_size, dim)


PORTABLE = {
    "seed_vgg": _seed_vgg,
    "vgg16": lambda pretrained: _strip(torchvision.models.vgg16(weights=_tv_weights("vgg16", pretrained)), "classifier"),
    "resnet18": lambda pretrained: _strip(torchvision.models.resnet18(weights=_tv_weights("resnet18", pretrained)), "fc"),
    "resnet50": lambda pretrained: _strip(torchvision.models.resnet50(weights=_tv_weights("resnet50", pretrained)), "fc"),
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_b0": _efficientnet_b0,
    "convnext_tiny": _convnext_tiny,
    "token_bag": _token_bag,
    "bert": bert.build,
    "minilm_l6": bert.build,
}

# torchvision models whose auxiliary classifiers we switch off: they change the train-mode output
_NATIVE_DEFAULTS = {"inception_v3": {"aux_logits": False, "init_weights": False},
                    "googlenet": {"aux_logits": False, "init_weights": False}}


def native_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the last nn.Linear (the classifier) with Identity; SqueezeNet's conv head by pooling."""
    if isinstance(model, torchvision.models.SqueezeNet):
        model.classifier = nn.Sequential(nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UnsupportedLayerError(
            f"Expected a torchvision classifier ending in nn.Linear (or SqueezeNet's conv head); "
            f"received {type(model).__name__}, which has no nn.Linear, so tlbridge cannot remove "
            f"its classifier. Use a portable backbone or another torchvision model.")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def build_native(name: str, pretrained: bool, options: dict) -> nn.Module:
    kwargs = {**_NATIVE_DEFAULTS.get(name, {}), **options}
    if pretrained:
        kwargs.pop("init_weights", None)
    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    return strip_classifier(model)

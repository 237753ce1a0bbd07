"""The PyTorch backend: implements backends/contract.py (Backend, DataParallel under torchrun);
its twin `tlbridge.backends.keras` exposes the same names."""
from __future__ import annotations

import numpy as np
import torch

from tlbridge.model import TransferModel
from tlbridge.specs import HeadSpec, ModelSpec

from . import backbones, compute, probe, devices, export, gate, lora, network, parallel, training, weights

NAME = "torch"

__all__ = ["NAME", "native_backbones", "build_backbone", "attach_head", "canonical_shapes",
           "param_names", "get_weights", "set_weights", "snapshot", "restore", "snapshot_weights",
           "apply_freeze", "features", "logits", "activations",
           "loss_and_grads", "make_trainer", "seed_epoch", "swap_batchnorm_momentum", "build_gate",
           "resolve_device", "device_scope", "place_built", "to_device", "set_tf32",
           "lora_layers", "export_model", "saved_model_runner", "init_parallel", "channels_last", "decided"]

export_model = export.export_model
saved_model_runner = export.saved_model_runner
resolve_device = devices.resolve
device_scope = devices.scope
to_device = devices.to_device
set_tf32 = devices.set_tf32


def place_built(m: TransferModel, device: str) -> None:
    """A model just built (on the CPU) goes to `device`."""
    devices.to_device(m, device)

seed_epoch = training.seed_epoch


def native_backbones() -> list[str]:
    return backbones.native_names()


def build_backbone(spec: ModelSpec, portable: bool, pretrained: bool, seed: int | None):
    """The bare backbone wrapped in a TLNet (identity head), in the spec's dtype, eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    options = dict(spec.options)
    if portable:
        module = backbones.PORTABLE[spec.backbone](pretrained, **options)
    else:
        module = backbones.build_native(spec.backbone, pretrained, options)
    lora.wrap(module, spec.adapters, "backbone.")
    net = network.TLNet(module).to(network.DTYPES[spec.dtype]).eval()
    with torch.no_grad():
        dim = net.backbone(compute.example(spec)).shape[-1]
    return net, {"feature_dim": int(dim)}


def build_gate(members: list, gate_on: str, gate_backbone=None):
    """Frozen members side by side (tlbridge/gate.py); attach_head then adds the gated head."""
    return gate.build_gate(members, gate_on, gate_backbone)


def attach_head(m: TransferModel, head: HeadSpec):
    if "gate" in m.state:
        return gate.attach_gate_head(m, head), dict(m.state)
    if head.tasks:
        heads, dropout = {}, 0.0
        for name, _, k, _ in head.tasks:
            heads[name], dropout = network.make_head(
                m.state["feature_dim"], HeadSpec(k, head.hidden, head.dropout))
        net = network.TLNet(m.native.backbone, None, dropout, heads=heads)
        return net.to(network.DTYPES[m.dtype]).train(False), dict(m.state)
    module, dropout = network.make_head(m.state["feature_dim"], head)
    net = network.TLNet(m.native.backbone, module, dropout).to(network.DTYPES[m.dtype])
    net.train(False)
    return net, dict(m.state)


def lora_layers(m: TransferModel) -> dict[str, tuple]:
    return lora.layers(m.native)


def canonical_shapes(m: TransferModel) -> dict[str, tuple]:
    return weights.canonical_shapes(m.native)


def param_names(m: TransferModel) -> list[str]:
    return weights.param_names(m.native)


def get_weights(m: TransferModel) -> dict[str, np.ndarray]:
    return weights.get_weights(m.native)


def set_weights(m: TransferModel, w: dict[str, np.ndarray]) -> None:
    weights.set_weights(m.native, w)


def snapshot(m: TransferModel) -> dict:
    return weights.snapshot(m.native)


def restore(m: TransferModel, snap: dict) -> None:
    weights.restore(m.native, snap)


def snapshot_weights(m: TransferModel, snap: dict) -> dict[str, np.ndarray]:
    return weights.snapshot_weights(snap)


def apply_freeze(m: TransferModel) -> None:
    weights.apply_freeze(m.native, m.frozen)


def features(m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    return compute.features(m.native, x, batch_size)


def logits(m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    return compute.logits(m.native, x, batch_size)


def activations(m: TransferModel, x: np.ndarray, training: bool):
    return probe.activations(m.native, x, training)


def channels_last(m: TransferModel, on: bool) -> None:
    probe.channels_last(m.native, on)


def decided(m: TransferModel, sites: list):
    return probe.decided(m.native, sites)


def loss_and_grads(m: TransferModel, x: np.ndarray, y: np.ndarray, training: bool, loss):
    return compute.loss_and_grads(m.native, x, y, training, loss)


def make_trainer(m: TransferModel, cfg, groups, regularizer, anchors, loss, precision="fp32",
                 parallel=None, compile=False):
    return training.Trainer(m.native, cfg, groups, regularizer, anchors, loss, precision,
                            parallel, compile)


def swap_batchnorm_momentum(m: TransferModel, momenta):
    """Set every BatchNorm's momentum (torch's convention: new = (1-m)*old + m*batch) to a
    float, or to a list a previous call returned; returns the previous list."""
    from torch.nn.modules.batchnorm import _BatchNorm
    bns = [mod for mod in m.native.modules() if isinstance(mod, _BatchNorm)]
    old = [mod.momentum for mod in bns]
    for mod, v in zip(bns, momenta if isinstance(momenta, list) else [momenta] * len(bns)):
        mod.momentum = v
    return old


def init_parallel(plan, m: TransferModel) -> None:
    """Join torchrun's process group (the plan's world and rank) on the model's device."""
    parallel.init(plan.world, plan.rank, m.device)

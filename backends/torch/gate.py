"""Adaptive fusion on PyTorch: frozen members side by side, and the gated head over them.

The composite is a TLNet like any other (backbone = MemberStack, head = GatedHead), so
fine_tune, its feature cache, checkpoints and canonical weights work on it unchanged. The
numbers follow tlbridge/gate.py (`forward`) op for op.
"""
from __future__ import annotations

import torch
from torch import nn

from tlbridge.specs import HeadSpec

from .network import TLNet, make_head


class MemberStack(nn.Module):
    """Outputs u = [gate input | member logits]: what the gated head reads. Members (and the
    gate's own backbone) stay in eval mode in train mode too: they are frozen, so neither
    their BatchNorm statistics nor their dropout may move."""

    def __init__(self, members: list[TLNet], gate_on: str, gate_backbone: nn.Module | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.gate_backbone = gate_backbone
        self.gate_on = gate_on

    def train(self, mode: bool = True):
        super().train(mode)
        for child in self.children():
            child.train(False)
        return self

    def forward(self, x):
        feats = [net.backbone(x) for net in self.members]
        zs = [net.apply_head(f) for net, f in zip(self.members, feats)]
        if self.gate_on == "logits":
            g = zs
        elif self.gate_on == "features":
            g = feats
        else:
            g = [self.gate_backbone(x)]
        return torch.cat([*g, *zs], dim=1)


class GatedHead(nn.Module):
    """softmax(gate(u[:, :D])) over members, then the weighted sum of member logits."""

    def __init__(self, gate_dim: int, members: int, outputs: int, spec: HeadSpec):
        super().__init__()
        self.gate, dropout = make_head(gate_dim, HeadSpec(members, spec.hidden, spec.dropout))
        self.gate_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate_dim, self.num_members, self.num_outputs = gate_dim, members, outputs

    def forward(self, u):
        g = u[:, :self.gate_dim]
        z = u[:, self.gate_dim:].reshape(-1, self.num_members, self.num_outputs)
        w = torch.softmax(self.gate(self.gate_dropout(g)), dim=1)
        return (w.unsqueeze(-1) * z).sum(dim=1)


def build_gate(members: list, gate_on: str, gate_backbone=None):
    """The headless composite of member TransferModels (whose natives it shares) and the
    state attach_head needs."""
    nets = [m.native for m in members]
    gb = None if gate_backbone is None else gate_backbone.native.backbone
    net = TLNet(MemberStack(nets, gate_on, gb)).eval()
    k = members[0].num_outputs
    dims = {"logits": len(members) * k,
            "features": sum(m.state["feature_dim"] for m in members),
            "backbone": None if gate_backbone is None else gate_backbone.state["feature_dim"]}
    gate_dim = dims[gate_on]
    gate = {"gate_dim": int(gate_dim), "members": len(members), "outputs": int(k)}
    return net, {"feature_dim": int(gate_dim + len(members) * k), "gate": gate}


def attach_gate_head(m, head: HeadSpec):
    g = m.state["gate"]
    module = GatedHead(g["gate_dim"], g["members"], g["outputs"], head)
    return TLNet(m.native.backbone, module).to(next(m.native.parameters()).dtype).train(False)

"""TLNet: backbone + head as one nn.Module whose state_dict *is* the canonical layout."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tlbridge.specs import HeadSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TLNet(nn.Module):
    """Frozen BatchNorm stays in eval mode across .train() calls (docs/parity.md #4)."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, dropout: float = 0.0,
                 heads: dict | None = None):
        super().__init__()
        self.backbone = backbone
        if heads is None:
            self.head = head if head is not None else nn.Identity()
        else:               # multi-task: heads.<task>.*, and the tasks' log-variances
            self.heads = nn.ModuleDict(heads)
            self.task_log_vars = nn.Parameter(torch.zeros(len(heads)))
            # one dropout per task (its own mask, as Keras draws one per head); no weights
            self.task_dropouts = nn.ModuleDict(
                {t: nn.Dropout(dropout) if dropout > 0 else nn.Identity() for t in heads})
            dropout = 0.0
        # dropout before a head without hidden layers (keeps its weights named head.weight)
        self.head_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def apply_head(self, f):
        """The head on backbone features; several heads' logits side by side, in task order."""
        f = self.head_dropout(f)
        if "heads" in self._modules:
            return torch.cat([h(self.task_dropouts[t](f)) for t, h in self.heads.items()], dim=1)
        return self.head(f)

    def forward(self, x):
        return self.apply_head(self.backbone(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, _BatchNorm) and module.weight is not None \
                        and not module.weight.requires_grad:
                    module.eval()
        return self


def make_head(in_features: int, spec: HeadSpec) -> tuple[nn.Module, float]:
    """The head module and the dropout TLNet applies before it (only when hidden == ())."""
    dims = spec.dims(in_features)
    if not spec.hidden:
        return nn.Linear(dims[0], dims[1]), spec.dropout
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(spec.dropout)]
    return nn.Sequential(*layers), 0.0

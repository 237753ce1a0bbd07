"""TransferModel: the framework-free handle every public function takes and returns."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from . import zoo
from .specs import HeadSpec, ModelSpec


@dataclass
class TransferModel:
    """A backbone plus a head on one backend.

    `native` is the framework's own model (torch nn.Module, keras.Model) for users who
    want to leave tlbridge; `frozen` holds the canonical names of frozen parameters.
    """

    backend: str
    native: Any
    spec: ModelSpec
    portable: bool
    frozen: set = field(default_factory=set)
    state: dict = field(default_factory=dict)   # backend-private handles (layer maps, ...)
    report: dict = field(default_factory=dict)  # what built it, e.g. a soup's ingredients and scores

    @property
    def device(self) -> str:
        """Where its weights live and its steps run: "cpu", "cuda:N" or "mps"."""
        return self.state.get("device", "cpu")

    @property
    def backbone_name(self) -> str:
        return self.spec.backbone

    @property
    def num_outputs(self) -> int | None:
        return None if self.spec.head is None else self.spec.head.num_outputs

    @property
    def input_shape(self) -> tuple:
        return tuple(self.spec.input_shape)

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def inputs(self) -> tuple:
        """The declared inputs (specs.InputSpec): name, per-sample shape, dtype and kind."""
        return zoo.signature(self.spec.backbone, self.spec.input_shape, self.spec.options)

    def with_head(self, head: HeadSpec) -> ModelSpec:
        return replace(self.spec, head=head)

    def __repr__(self) -> str:
        head = "no head" if self.spec.head is None else f"{self.num_outputs} output(s)"
        return (f"TransferModel(backbone={self.backbone_name!r}, backend={self.backend!r}, "
                f"input_shape={self.input_shape}, dtype={self.dtype!r}, {head}, "
                f"frozen={len(self.frozen)} tensors)")

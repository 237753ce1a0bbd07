"""What a backend implements: the written contract between framework-free tlbridge and an engine.

tlbridge/ validates in numpy and decides *what* happens; a backend package (backends/torch,
backends/keras) decides *how*, in its framework. Every call tlbridge makes into a backend is
listed here with its signature and meaning; tests/test_contract.py checks each installed
backend against it (same names, parameter kinds and defaults) and each backend's `__all__`.

Adding an engine (e.g. Keras on JAX), in four steps:
  1. A package backends/<name>/ (installed as tlbridge.backends.<name>) whose `__init__`
     implements every member of `Backend` below with the same signature, and lists them in
     `__all__` (plus the names of each optional part it implements in full).
  2. `make_trainer` returns an object with every member of `Trainer`.
  3. Register it in tlbridge/registry.py: `BACKENDS[<name>] = BackendEntry(<name>,
     "tlbridge.backends.<name>", (<framework modules it needs>,), <install hint>)`, and add
     the package to pyproject.toml's `packages` (and an install extra).
  4. Run `contract.mismatches(module)` (empty when it conforms) and the parity tests.

Optional parts: `DataParallel` (fine_tune data-parallel: a tlbridge.parallel.Plan reaches
init_parallel and make_trainer) and `Replicas` (data-parallel over devices in one process,
fine_tune(..., parallel=tl.Parallel(replicas=N))), and `Float64Truth` (the float32 judge's
reference runs, torch only). Which backend a launch hands a Plan to is
decided in tlbridge/training/plan.py (parallel_plan: torchrun -> torch, replicas -> keras).

Conventions every member follows (docs/parity.md): weights cross the boundary as numpy arrays
under canonical names (torch's state_dict names and layouts, without num_batches_tracked);
model inputs are one array (NHWC float images in the model's dtype) or, for a model with
several declared inputs, a dict {name: array} (token ids and masks int64; tlbridge/inputs.py); `m.frozen` holds canonical parameter names;
`m.state` is the backend's own dict (kept across calls) and must hold "feature_dim" after
build_backbone / build_gate and "device" after place_built / to_device (m.device reads it).

This module imports no framework (tlbridge imports it without torch, TensorFlow or Keras).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from tlbridge.losses import Loss
    from tlbridge.model import TransferModel
    from tlbridge.multitask import MultiLoss
    from tlbridge.optim import OptimizerConfig
    from tlbridge.parallel import Plan
    from tlbridge.specs import HeadSpec, ModelSpec


@runtime_checkable
class Trainer(Protocol):
    """What make_trainer returns: the optimizer of one fine_tune call (tlbridge/training/)."""

    last_parts: np.ndarray | None
    """Multi-task: the last step's per-task losses (NaN for a task without labels); else None."""

    loss_scale: float | None
    """fp16: the loss scale after the last step (torch.amp.GradScaler's rules); else None."""

    last_rows: tuple[int, ...] | None
    """The rows the last step's forward pass trained on, one count per replica this process
    runs: (batch,) in one process, (this rank's share,) under torchrun, each replica's share
    under Keras replicas; None before the first step. What the data-parallel tests check
    against tlbridge/parallel.py's shard_bounds (a head step that skipped sharding would
    train every rank on the whole batch, and its all-reduced gradient would still agree)."""

    def step(self, x: np.ndarray, y: np.ndarray, lrs: list[float]) -> tuple[float, float]:
        """One optimizer step on inputs x (BatchNorm in train mode): (loss, L2-SP penalty)."""

    def head_step(self, f: np.ndarray, y: np.ndarray, lrs: list[float]) -> tuple[float, float]:
        """The same step from cached backbone features f (the backbone is frozen)."""

    def end_epoch(self) -> None:
        """The epoch's steps are over: undo per-epoch set-up (train mode, parallel wrappers)."""

    def close(self) -> None:
        """fine_tune is over: release what the trainer holds (a later one builds its own)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as '<slot>/<param name>' and 'step/<name>' arrays, torch layout."""

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from a state_dict (of either backend): replaces all state held."""

    def set_anchors(self, anchors: dict[str, np.ndarray]) -> None:
        """L2-SP: the starting weights, by canonical name, the penalty pulls backbone weights to."""


@runtime_checkable
class Backend(Protocol):
    """Required of every backend package (tlbridge.backends.<name>)."""

    NAME: str
    """The registry name ("torch", "keras"), as in TransferModel.backend."""

    # -- building --------------------------------------------------------------------------
    def native_backbones(self) -> list[str]:
        """Names of the framework's own backbones load_backbone accepts (not portable)."""

    def build_backbone(self, spec: ModelSpec, portable: bool, pretrained: bool,
                       seed: int | None) -> tuple[Any, dict]:
        """(native, state) of the headless backbone of spec (pretrained: the framework loads
        ImageNet weights itself); state holds "feature_dim"; runs under device_scope."""

    def attach_head(self, m: TransferModel, head: HeadSpec) -> tuple[Any, dict]:
        """(native, state) of headless m (shared backbone) with `head` (multi-task: heads.<task>,
        task_log_vars; gate in m.state: the gated head); caller sets the head's weights."""

    def build_gate(self, members: list[TransferModel], gate_on: str,
                   gate_backbone: TransferModel | None = None) -> tuple[Any, dict]:
        """(native, state) of frozen members side by side (tlbridge/gate.py); state holds
        "feature_dim" and "gate": {"gate_dim", "members", "outputs"}."""

    # -- adapters --------------------------------------------------------------------------
    def lora_layers(self, m: TransferModel) -> dict[str, tuple]:
        """Canonical module name -> (kind "linear" | "conv", in, out, kh, kw, groups) of every
        Linear / Conv2d of the backbone LoRA could wrap; build_backbone wraps those listed in
        spec.adapters (tlbridge/lora.py)."""

    # -- weights and freezing --------------------------------------------------------------
    def canonical_shapes(self, m: TransferModel) -> dict[str, tuple]:
        """Canonical name -> torch-layout shape of every tensor (parameters and buffers)."""

    def param_names(self, m: TransferModel) -> list[str]:
        """Canonical names of the parameters (not buffers), in optimizer order."""

    def get_weights(self, m: TransferModel) -> dict[str, np.ndarray]:
        """Canonical name -> a copy of every tensor, torch layout."""

    def set_weights(self, m: TransferModel, w: dict[str, np.ndarray]) -> None:
        """Assign the given canonical tensors (names checked and dtype cast by the caller)."""

    def snapshot(self, m: TransferModel) -> Any:
        """A copy of every tensor get_weights covers, in the framework's own layout, cheap to
        take (fine_tune takes one every epoch to go back to): no layout conversion."""

    def restore(self, m: TransferModel, snap: Any) -> None:
        """The weights of a snapshot written back into m."""

    def snapshot_weights(self, m: TransferModel, snap: Any) -> dict[str, np.ndarray]:
        """A snapshot's weights as get_weights gives them (canonical names and layout)."""

    def apply_freeze(self, m: TransferModel) -> None:
        """Make m.frozen untrainable and every other parameter trainable; a BatchNorm with all
        its parameters frozen normalises with its running statistics."""

    def swap_batchnorm_momentum(self, m: TransferModel, momenta: float | list) -> list:
        """Set every BatchNorm's momentum (torch's convention) to a float or a list an earlier
        call returned; returns the previous list."""

    # -- computing -------------------------------------------------------------------------
    def features(self, m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Backbone outputs (N, feature_dim) of inputs x, in inference mode, batch by batch."""

    def logits(self, m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Head outputs before any activation (N, outputs), in inference mode."""

    def activations(self, m: TransferModel, x: np.ndarray, training: bool) -> tuple[list, np.ndarray]:
        """([(kind, input, pool)], logits) of one forward pass, for the float32 judge
        (tlbridge/fp32.py): the input of every nonlinearity in forward order, float64 in the
        framework's own layout (tlbridge/fp32.py lines them up); kind "relu", "relu6", "maxpool" (pool: torch's (size, stride, padding), the input
        unpadded) or "smooth" (GELU, SiLU, sigmoid). Train mode updates BatchNorm statistics."""

    def loss_and_grads(self, m: TransferModel, x: np.ndarray, y: np.ndarray, training: bool,
                       loss: Loss | MultiLoss) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, canonical gradient of every trainable parameter) of one batch, no update;
        training=True runs BatchNorm in train mode (its running statistics update)."""

    # -- training --------------------------------------------------------------------------
    def make_trainer(self, m: TransferModel, cfg: OptimizerConfig,
                     groups: list[tuple[float, list[str]]],
                     regularizer: tuple[float, float] | None,
                     anchors: dict[str, np.ndarray] | None, loss: Loss | MultiLoss,
                     precision: str = "fp32", parallel: Plan | None = None,
                     compile: bool = False) -> Trainer:
        """The Trainer of one fine_tune call: groups (lr, names), L2-SP (alpha, beta) about
        anchors, precision "fp32" / "bf16" / "fp16", parallel a Plan or None, compile: run
        the steps compiled (never with a Plan: tlbridge refuses that combination first); a
        missing compiler toolchain raises CompileError before the first step."""

    def seed_epoch(self, m: TransferModel, seed: int) -> None:
        """Reseed the random streams the model draws from (dropout) for one epoch."""

    # -- devices ---------------------------------------------------------------------------
    def resolve_device(self, device: str) -> str:
        """A normalised name ("auto", "cpu", "cuda:N", "mps") -> one this machine has; else
        raise tlbridge.devices.unavailable(...)."""

    def device_scope(self, device: str) -> ContextManager:
        """The context models are built under, to be created on `device`."""

    def place_built(self, m: TransferModel, device: str) -> None:
        """A model just built under device_scope(device) goes (or is recorded) there."""

    def to_device(self, m: TransferModel, device: str) -> bool:
        """Move m to `device` in place and return True; return False where the framework
        cannot move a model (tlbridge/api.py then rebuilds it there, same weights)."""

    def set_tf32(self, enabled: Any) -> Any:
        """Allow or forbid TF32 (a bool, or a value set_tf32 returned); returns the previous."""


@runtime_checkable
class DataParallel(Protocol):
    """Optional: data-parallel fine_tune (a tlbridge.parallel.Plan reaches make_trainer)."""

    def init_parallel(self, plan: Plan, m: TransferModel) -> None:
        """Before the Trainer: join the ranks or check the model can train on the plan."""


@runtime_checkable
class Replicas(DataParallel, Protocol):
    """Optional: data-parallel over devices of one process, fine_tune(..., replicas=N)."""

    def replica_plan(self, replicas: Any, bn_sync: str) -> Plan:
        """replicas (an int, or the framework's own strategy) -> the Plan the Trainer runs."""

    def cpu_replicas(self, n: int) -> list[str]:
        """Split the CPU into n devices for replicas=n (before the framework starts)."""


@runtime_checkable
class Float64Truth(Protocol):
    """Optional: the float32 judge's reference runs (tlbridge/fp32.py); torch, whose float64
    model is the truth."""

    def channels_last(self, m: TransferModel, on: bool) -> None:
        """Run the model's convolutions in channels_last memory (TensorFlow's CPU kernels)."""

    def decided(self, m: TransferModel, sites: list) -> ContextManager:
        """While open, the model takes every kink decision (ReLU, ReLU6, max-pool) of another
        run's activations() `sites`, with its own values."""


@runtime_checkable
class Export(Protocol):
    """Optional: tl.export (tlbridge/exporting.py writes the metadata and runs the check)."""

    def export_model(self, m: TransferModel, path: str, format: str, outputs: tuple) -> None:
        """Write m as `format` ("onnx", "saved_model"): input the float NHWC batch (or the named
        token inputs) tl.logits takes, any batch size; outputs ((name, a, b), ...): logits
        columns a:b under each name. A format the backend cannot write raises ExportError
        naming the route that can."""

    def saved_model_runner(self, path: str) -> Any:
        """A SavedModel folder as a function {input: numpy} -> {output: numpy}."""


def members(protocol: type) -> tuple[str, ...]:
    """The names a Protocol lists (its own and inherited): attributes, then methods."""
    names: dict[str, None] = {}
    for klass in reversed(protocol.__mro__):
        if klass.__module__ != __name__:        # object, Protocol, Generic
            continue
        names.update(dict.fromkeys(inspect.get_annotations(klass)))
        names.update(dict.fromkeys(k for k, v in klass.__dict__.items()
                                   if inspect.isfunction(v) and not k.startswith("_")))
    return tuple(names)


PARTS: dict[str, type] = {"DataParallel": DataParallel, "Replicas": Replicas,
                          "Float64Truth": Float64Truth, "Export": Export}
REQUIRED: tuple[str, ...] = members(Backend)
OPTIONAL: dict[str, tuple[str, ...]] = {part: members(p) for part, p in PARTS.items()}
TRAINER: tuple[str, ...] = members(Trainer)


def expected_signature(protocol: type, name: str) -> inspect.Signature:
    """The signature a backend's function (or a Trainer's method) must have: the Protocol's
    method without `self`."""
    sig = inspect.signature(getattr(protocol, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def shape(sig: inspect.Signature) -> list[tuple]:
    """What must match: each parameter's name, kind and default (annotations are documentation)."""
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


def claimed(module) -> tuple[str, ...]:
    """The optional parts a backend says it implements: those with a name of their own (not
    inherited from another part) in its __all__; a claimed part must then be there in full."""
    listed = set(getattr(module, "__all__", ()))
    out = []
    for part, protocol in PARTS.items():
        inherited = set().union(*(members(b) for b in protocol.__bases__
                                  if b.__module__ == __name__))
        if listed & (set(OPTIONAL[part]) - inherited):
            out.append(part)
    return tuple(out)


def _check(owner, protocol: type, names, where: str) -> list[str]:
    out = []
    for name in names:
        if not hasattr(owner, name):
            out.append(f"{where}.{name} is missing")
        elif inspect.isfunction(getattr(protocol, name, None)):
            want = expected_signature(protocol, name)
            fn = getattr(owner, name)
            have = inspect.signature(fn) if callable(fn) else None
            if have is not None and inspect.isclass(owner):    # a class's method: drop self
                have = have.replace(parameters=list(have.parameters.values())[1:])
            if have is None or shape(have) != shape(want):
                out.append(f"{where}.{name}{have} differs from the contract's {name}{want}")
    return out


def mismatches(module, trainer: type | None = None) -> list[str]:
    """Everything in which `module` (a backend package) and `trainer` (the class its
    make_trainer returns, if given) differ from this contract; empty when they conform."""
    where = getattr(module, "__name__", "backend")
    out = _check(module, Backend, REQUIRED, where)
    parts = claimed(module)
    for part in parts:
        out += _check(module, PARTS[part], OPTIONAL[part], where)
    want = set(REQUIRED).union(*(OPTIONAL[p] for p in parts))
    listed = set(getattr(module, "__all__", ()))
    if listed != want:
        out.append(f"{where}.__all__ should be the contract's names {sorted(want)}; it lacks "
                   f"{sorted(want - listed)} and has extra {sorted(listed - want)}")
    if trainer is not None:
        attributes = set(inspect.get_annotations(Trainer))      # values, not methods
        out += _check(trainer, Trainer, [n for n in TRAINER if n not in attributes],
                      f"{trainer.__module__}.{trainer.__qualname__}")
    return out

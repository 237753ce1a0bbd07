"""The Keras 3 backend: implements backends/contract.py (Backend, DataParallel, Replicas); its
twin `tlbridge.backends.torch` exposes the same names. Keras runs on TensorFlow (the default) or
on JAX (KERAS_BACKEND=jax, Keras' own switch): the layers are shared, the steps, devices and
distribution sit in engine_tf.py / engine_jax.py."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up chatter (oneDNN notice, "Could not find cuda drivers", "failed call
# to cuInit" on a machine without a GPU) is not the user's business. 3 hides TF's C++ INFO,
# WARNING and ERROR logs (the cuInit line is an ERROR); a value the user set is kept as it is.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ["KERAS_BACKEND"] == "jax" and "keras" not in sys.modules:
    # float64 layers compute in float32 on JAX unless x64 is on before any array is made
    import jax
    jax.config.update("jax_enable_x64", True)

_ABSL_RECORD = re.compile(r"([IWEF])\d{4} ")
_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called"


def _tf_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _drop_below(text: str, level: int) -> str:
    """Lines of absl log records below `level` (TF's scale: 0 INFO .. 3 FATAL) removed; a
    record's continuation lines go with it, absl's "before InitializeLog" notice is shown only
    with a record that is shown; other output is kept."""
    kept, keep, notice = [], True, ""
    for line in text.splitlines(keepends=True):
        if line.startswith(_ABSL_PREINIT):
            notice = line
            continue
        record = _ABSL_RECORD.match(line)
        if record:
            keep = "IWEF".index(record.group(1)) >= level
            if keep and notice:
                kept.append(notice)
                notice = ""
        if keep:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _quiet_tensorflow_startup():
    """Apply TF_CPP_MIN_LOG_LEVEL to the lines TensorFlow's native libraries log while they load.

    Since TensorFlow moved to absl logging (2.21 here), records logged before
    absl::InitializeLog() go to stderr whatever the level, so the variable alone does not
    silence them. Native writes to file descriptor 2 are captured for the import only and
    re-emitted without the records below the level; Python's own stderr keeps writing to the
    terminal directly. If the import fails, everything captured is shown.
    """
    level = _tf_log_level()
    if level <= 0 or "tensorflow" in sys.modules:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):   # no usable stderr: nothing to keep clean
        yield
        return
    python_stderr = sys.stderr
    try:
        swap = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        swap = False
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        if swap:  # Python-level writes (warnings) skip the capture; not closed: may be kept
            sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace")
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if swap:
                sys.stderr.flush()
                sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            text = text if failed else _drop_below(text, level)
            if text:
                python_stderr.write(text)
                python_stderr.flush()


if os.environ["KERAS_BACKEND"] == "tensorflow" and "keras" not in sys.modules:
    with _quiet_tensorflow_startup():
        import keras  # noqa: E402
else:
    import keras  # noqa: E402
import numpy as np  # noqa: E402

from tlbridge.errors import BackendNotInstalledError, UnsupportedLayerError  # noqa: E402
from tlbridge.model import TransferModel  # noqa: E402
from tlbridge import zoo  # noqa: E402
from tlbridge.specs import HeadSpec, ModelSpec  # noqa: E402

if keras.backend.backend() not in ("tensorflow", "jax"):
    raise BackendNotInstalledError(
        f"Expected Keras 3 on TensorFlow or JAX for tlbridge's Keras backend; received "
        f"KERAS_BACKEND={keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow (or jax) "
        "before importing keras.")
if keras.backend.backend() == "jax":
    import jax  # noqa: E402
    if not jax.config.jax_enable_x64:   # keras imported before tlbridge: not too late yet
        jax.config.update("jax_enable_x64", True)

from . import backbones, engine, gate, lora, network, seeds, weights  # noqa: E402

if engine.TENSORFLOW:
    from . import engine_tf as impl  # noqa: E402
else:
    from . import engine_jax as impl  # noqa: E402

cpu_replicas = impl.cpu_replicas
impl.from_env()     # TLBRIDGE_CPU_REPLICAS=N: split the CPU before TensorFlow starts
impl.grow_gpu_memory()  # before the engine's first GPU allocation: torch keeps room

NAME = "keras"

__all__ = ["NAME", "native_backbones", "build_backbone", "attach_head", "canonical_shapes",
           "param_names", "get_weights", "set_weights", "snapshot", "restore", "snapshot_weights",
           "apply_freeze", "features", "logits", "activations",
           "loss_and_grads", "make_trainer", "seed_epoch", "swap_batchnorm_momentum", "build_gate",
           "resolve_device", "device_scope", "place_built", "to_device", "set_tf32",
           "lora_layers", "export_model", "saved_model_runner", "cpu_replicas", "replica_plan", "init_parallel"]

export_model = impl.export_model
saved_model_runner = impl.saved_model_runner
resolve_device = impl.resolve_device
device_scope = impl.device_scope
to_device = impl.to_device
set_tf32 = impl.set_tf32


def place_built(m: TransferModel, device: str) -> None:
    """A model just built under device_scope(device) records where its variables live."""
    m.state["device"] = device

seed_epoch = impl.seed_epoch


def native_backbones() -> list[str]:
    return backbones.native_names()


def build_backbone(spec: ModelSpec, portable: bool, pretrained: bool, seed: int | None):
    if seed is not None:
        seeds.set_random_seed(seed)
    options = dict(spec.options)
    if portable:
        inputs = _inputs(spec)
        mirror = network.Mirror(spec.dtype, scope="backbone.", adapters=spec.adapters)
        feats = backbones.PORTABLE[spec.backbone](mirror, inputs, pretrained, **options)
        backbone_slots = weights.slots_for(mirror.entries)
        layers = [layer for _, _, layer in mirror.entries]
        adaptable = lora.layers_of(mirror.entries)
    else:
        if spec.adapters:
            raise UnsupportedLayerError(
                f"Expected a portable backbone for LoRA on Keras; received the Keras-native "
                f"{spec.backbone!r}. Use a portable backbone ({sorted(zoo.PORTABLE)}) or torch.")
        adaptable = {}
        previous = keras.config.floatx()
        keras.config.set_floatx(spec.dtype)
        try:
            base = backbones.build_native(spec.backbone, pretrained, spec.input_shape, options)
        finally:
            keras.config.set_floatx(previous)
        inputs, feats = base.inputs[0], base.outputs[0]
        backbone_slots = weights.native_slots(base)
        layers = list(base.layers)
    feature_model = keras.Model(inputs, feats, name=f"{spec.backbone}_features")
    state = {"inputs": inputs, "feats": feats, "feature_model": feature_model,
             "backbone_slots": backbone_slots, "slots": backbone_slots, "layers": layers,
             "feature_dim": int(feats.shape[-1]), "lora_layers": adaptable}
    return feature_model, state


def _inputs(spec: ModelSpec):
    """keras.Input for each declared input (tlbridge/zoo.py signature): one for images, a dict
    {name: Input} for a model with several."""
    sig = zoo.signature(spec.backbone, spec.input_shape, spec.options)
    made = {s.name: keras.Input(shape=s.shape, dtype=spec.dtype if s.is_float else s.dtype,
                                name=s.name) for s in sig}
    return made[sig[0].name] if len(sig) == 1 else made


def build_gate(members: list, gate_on: str, gate_backbone=None):
    """Frozen members side by side (tlbridge/gate.py); attach_head then adds the gated head."""
    return gate.build_gate(members, gate_on, gate_backbone)


def attach_head(m: TransferModel, head: HeadSpec):
    if "gate" in m.state:
        return gate.attach_gate_head(m, head)
    state = {k: v for k, v in m.state.items() if not k.startswith("_")}  # caches of the old head
    state.pop("log_vars", None)
    mirror = network.Mirror(m.dtype)
    extra_slots, extra_layers = [], []
    if head.tasks:      # multi-task: heads.<task>.* side by side, in task order
        outs = [network.make_head(mirror, state["feats"], HeadSpec(k, head.hidden, head.dropout),
                                  prefix=f"heads.{name}") for name, _, k, _ in head.tasks]
        logits = outs[0] if len(outs) == 1 else keras.layers.Concatenate(dtype=m.dtype)(outs)
        holder = network.TaskLogVars(len(head.tasks), name="task_log_vars", dtype=m.dtype)
        holder.build()
        state["log_vars"] = holder.log_vars
        extra_slots = [weights.Slot("task_log_vars", holder.log_vars, weights._same,
                                    weights._same, True)]
        extra_layers = [holder]
    else:
        logits = network.make_head(mirror, state["feats"], head)
    model = keras.Model(state["inputs"], logits, name=f"{m.backbone_name}_transfer")
    state["head_model"] = keras.Model(state["feats"], logits, name="head")  # for cached features
    state["slots"] = state["backbone_slots"] + weights.slots_for(mirror.entries) + extra_slots
    state["layers"] = state["layers"] + [layer for _, _, layer in mirror.entries] + extra_layers
    return model, state


def lora_layers(m: TransferModel) -> dict[str, tuple]:
    return dict(m.state.get("lora_layers", {}))


def canonical_shapes(m: TransferModel) -> dict[str, tuple]:
    return weights.canonical_shapes(m.state["slots"])


def param_names(m: TransferModel) -> list[str]:
    return [s.name for s in m.state["slots"] if s.is_param]


def get_weights(m: TransferModel) -> dict[str, np.ndarray]:
    return weights.get_weights(m.state["slots"])


def set_weights(m: TransferModel, w: dict[str, np.ndarray]) -> None:
    weights.set_weights(m.state["slots"], w)


def snapshot(m: TransferModel) -> list:
    return weights.snapshot(m.state["slots"])


def restore(m: TransferModel, snap: list) -> None:
    weights.restore(m.state["slots"], snap)


def snapshot_weights(m: TransferModel, snap: list) -> dict[str, np.ndarray]:
    return weights.snapshot_weights(m.state["slots"], snap)


def apply_freeze(m: TransferModel) -> None:
    weights.apply_freeze(m.state["slots"], m.state["layers"], m.frozen)


def features(m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    return impl.features(m, x, batch_size)


def logits(m: TransferModel, x: np.ndarray, batch_size: int) -> np.ndarray:
    return impl.logits(m, x, batch_size)


def activations(m: TransferModel, x: np.ndarray, training: bool):
    return impl.activations(m, x, training)


def loss_and_grads(m: TransferModel, x: np.ndarray, y: np.ndarray, training: bool, loss):
    return impl.loss_and_grads(m, x, y, training, loss)


def make_trainer(m: TransferModel, cfg, groups, regularizer, anchors, loss, precision="fp32",
                 parallel=None, compile=False):
    return impl.Trainer(m, cfg, groups, regularizer, anchors, loss, precision, parallel, compile)


def swap_batchnorm_momentum(m: TransferModel, momenta):
    """Set every BatchNorm's momentum, in torch's convention (keras.layers.BatchNormalization,
    in native backbones, keeps Keras' 1 - m), to a float or a list a previous call returned;
    returns the previous list. Read at call time by the eager train-mode pass."""
    bns = [layer for layer in m.native._flatten_layers(include_self=False)
           if isinstance(layer, (network.TorchBatchNorm, keras.layers.BatchNormalization))]
    old = [layer.momentum if isinstance(layer, network.TorchBatchNorm) else 1.0 - layer.momentum
           for layer in bns]
    for layer, v in zip(bns, momenta if isinstance(momenta, list) else [momenta] * len(bns)):
        layer.momentum = v if isinstance(layer, network.TorchBatchNorm) else 1.0 - v
    return old


def replica_plan(replicas, bn_sync: str):
    """fine_tune(..., replicas=N or a MirroredStrategy): the plan its Trainer runs."""
    return impl.replica_plan(replicas, bn_sync)


def init_parallel(plan, m: TransferModel) -> None:
    """Nothing to join or refuse: replicas read the model's plain variables, and every
    BatchNorm (tlbridge's, and Keras' own in keras.applications backbones: parallel.py's
    keras_batchnorm) follows plan.bn_sync, frozen or trainable, in every unfreeze phase."""

"""Keras on JAX: what the Keras backend needs from its engine (the twin of engine_tf.py, same
names). Forward passes and gradients run the shared Keras layers statelessly (keras.StatelessScope
over every variable of the model), so `jax.value_and_grad` and `jax.jit` see plain functions of
arrays; the updated values are written back into the Keras variables afterwards.

A training step (forward, loss, L2-SP penalty, gradients, tlbridge's optimizer formulas) is one
`jax.jit` per trainable set and loss, kept with the model like the TensorFlow engine's traced
steps; jit traces once per batch shape, so a ragged last batch adds one trace, reused every epoch.
Mixed precision traces the step under Keras' mixed policies (mixed.py, shared with TensorFlow);
data-parallel replicas wrap the same step's loss in a shard_map (parallel_jax.py).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.extend import core as jcore
from keras import ops

from tlbridge import devices as tl_devices
from tlbridge import inputs
from tlbridge.losses import Loss
from tlbridge.optim import OptimizerConfig

from . import engine, parallel_jax
from .losses import loss_fn, multi_loss, task_counts
from .mixed import GROWTH_INTERVAL, INITIAL_SCALE, mixed_policy
from .network import TorchBatchNorm
from .seeds import seed_epoch  # noqa: F401  (the engine's seed_epoch)

__all__ = ["features", "logits", "loss_and_grads", "activations", "Trainer", "traced_steps",
           "seed_epoch", "resolve_device", "device_scope", "to_device", "set_tf32", "cpu_replicas",
           "from_env", "replica_plan", "grow_gpu_memory", "export_model", "saved_model_runner"]


# -- stateless calls ------------------------------------------------------------------------
def variables_of(model, *extra) -> list:
    """Every variable a call of `model` reads (weights, BatchNorm statistics, seed states), and
    the extra ones a loss reads (a multi-task head's log-variances), each once."""
    seen, out = set(), []
    for v in [*model.variables, *(e for e in extra if e is not None)]:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def stateless(variables, values, fn):
    """fn() run with `variables` holding `values`: (its result, the variables' values after it)."""
    with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
        out = fn()
        after = [scope.get_current_value(v) for v in variables]
    return out, [a if a is not None else b for a, b in zip(after, values)]


def _values(variables) -> list:
    return [v.value for v in variables]


def _write(variables, values) -> None:
    for v, value in zip(variables, values):
        v.assign(value)


# -- forward passes and gradients -----------------------------------------------------------
def _forward_fn(m, which: str):
    """A cached jax.jit of the model in inference mode (eager Keras is several times slower)."""
    key = f"_fwd_{which}"
    if key not in m.state:
        model = m.state["feature_model"] if which == "features" else m.native
        variables = variables_of(model)
        fn = jax.jit(lambda values, x: stateless(variables, values,
                                                 lambda: model(x, training=False))[0])
        m.state[key] = (fn, variables)
    return m.state[key]


def _batched(m, which, x, batch_size):
    fn, variables = _forward_fn(m, which)
    values = _values(variables)
    with device_scope(m.state.get("device", "cpu")):
        return np.concatenate([np.asarray(fn(values, inputs.trim(inputs.rows(x, slice(i, i + batch_size)))))
                               for i in range(0, inputs.length(x), batch_size)], axis=0)


def features(m, x, batch_size):
    return _batched(m, "features", x, batch_size)


def logits(m, x, batch_size):
    return _batched(m, "logits", x, batch_size)


def loss_and_grads(m, x: np.ndarray, y: np.ndarray, training: bool, loss):
    """The loss from logits, and d loss / d every trainable parameter in the canonical (torch)
    layout; a train-mode pass updates BatchNorm statistics as on TensorFlow. Jitted once per
    trainable set, mode and loss (op-by-op JAX under value_and_grad is several times slower)."""
    slots = [s for s in m.state["slots"] if s.is_param and s.name not in m.frozen]
    key = (tuple(s.name for s in slots), bool(training), loss)
    cache = m.state.setdefault("_grad_fns", {})
    if key not in cache:
        cache[key] = _grad_fn(m, slots, training, loss)
    fn, trainable, others, bns = cache[key]
    momenta = tuple(float(layer.momentum) for layer in bns)    # Python floats: weakly typed
    with device_scope(m.state.get("device", "cpu")):
        (value, after), grads = fn(_values(trainable), _values(others), momenta, x, y)
    _write(others, after)
    return float(value), {s.name: np.asarray(s.to_canonical(np.asarray(g)))
                          for s, g in zip(slots, grads)}


def _grad_fn(m, slots, training, loss):
    log_vars = m.state.get("log_vars")
    trainable = [s.variable for s in slots]
    ids = {id(v) for v in trainable}
    others = [v for v in variables_of(m.native, log_vars) if id(v) not in ids]
    bns = [layer for layer in m.native._flatten_layers(include_self=False)
           if isinstance(layer, (TorchBatchNorm, keras.layers.BatchNormalization))]

    def objective(tv, ov, momenta, x, y):
        def run():
            z = m.native(x, training=training)
            return loss_fn(z, y, loss, None if log_vars is None else log_vars.value)
        with _momenta(bns, momenta):
            value, after = stateless(trainable + others, list(tv) + list(ov), run)
        return value, after[len(tv):]
    return jax.jit(jax.value_and_grad(objective, has_aux=True)), trainable, others, bns


@contextlib.contextmanager
def _momenta(bns, momenta):
    """BatchNorm momenta as arguments of the jitted pass, not constants of its trace: soups
    and the float32 judge change them between passes (swap_batchnorm_momentum)."""
    saved = [layer.momentum for layer in bns]
    try:
        for layer, value in zip(bns, momenta):
            layer.momentum = value
        yield
    finally:
        for layer, value in zip(bns, saved):
            layer.momentum = value


def activations(m, x, training: bool):
    from . import probe
    return probe.activations(m, x, training)


# -- the compiled step ----------------------------------------------------------------------
class _Compiled:
    """What one model keeps across Trainers: optimizer state (slot -> name -> array, Keras
    layout), L2-SP anchors by name, jitted steps by key, and how many traces they made."""

    def __init__(self):
        self.state: dict[str, dict[str, jax.Array]] = {}
        self.anchors: dict[str, jax.Array] = {}
        self.steps: dict[tuple, _Step] = {}
        self.traces = 0
        self.scaling = _start_scaling()     # fp16: (loss scale, good steps since a change)


def _start_scaling() -> tuple:
    return jnp.asarray(INITIAL_SCALE, "float32"), jnp.asarray(0, "int64")


def _compiled(m) -> _Compiled:
    if "_train" not in m.state:
        m.state["_train"] = _Compiled()
    return m.state["_train"]


def traced_steps(m) -> int:
    """How many step functions jit has traced for this model (a retrace check for tests)."""
    c = m.state.get("_train")
    return 0 if c is None else c.traces


class _Step:
    """One jitted step for a trainable set: a pure function of (trainable values, the other
    variables' values, optimizer state, anchors, x, y, per-parameter scalars). It closes over
    the model and constants only, never a Trainer, so later Trainers of the model reuse it."""

    def __init__(self, trainer, names, head_only):
        m = trainer.m
        self.model = m.state["head_model"] if head_only else m.native
        self.slots = [trainer.slots[n] for n in names]
        self.cfg, self.reg, self.loss_spec = trainer.cfg, trainer.reg, trainer.loss
        self.log_vars = m.state.get("log_vars")
        self.trainable = [s.variable for s in self.slots]
        ids = {id(v) for v in self.trainable}
        self.others = [v for v in variables_of(self.model, self.log_vars) if id(v) not in ids]
        self.reached = None         # which parameters the loss reaches (set on the first call)
        self.compiled = trainer.compiled
        self.precision, self.dtype = trainer.precision, m.dtype
        self.parallel = trainer.parallel
        if self.parallel is not None:
            _check_replica_batchnorm(self.model)
        self.fn = None

    def run_loss(self, tv, ov, x, y, **share):
        """((loss, per-task losses), the other variables after) of a train-mode pass; `share`
        (rows, mask, counts, first): one replica's share of a global batch (parallel_jax)."""
        def run():
            with mixed_policy(self.model, self.precision):
                z = self.model(x, training=True)
            z = ops.cast(z, self.dtype)                 # the loss in float32+ (bf16 too)
            if self.loss_spec.name == "multi":
                return multi_loss(z, y, self.loss_spec, self.log_vars.value,
                                  share.get("counts"), share.get("first"))
            return (loss_fn(z, y, self.loss_spec, rows=share.get("rows"), mask=share.get("mask")),
                    ops.zeros((0,), z.dtype))
        out, after = stateless(self.trainable + self.others, list(tv) + list(ov), run)
        return out, after[len(tv):]

    def task_counts(self, y):
        """Present labels per task in a global batch (multi-task data-parallel steps)."""
        return task_counts(y, self.loss_spec)

    def objective(self, tv, ov, anchors, x, y, scale=1.0):
        """(loss + penalty, fp16: times the loss scale; (loss, penalty, per-task losses, the
        other variables after))."""
        (loss, parts), after = self.run_loss(tv, ov, x, y)
        pen = self.penalty(tv, anchors) if self.reg is not None and self.slots \
            else ops.zeros((), loss.dtype)
        return self.scaled(loss + pen, scale), (loss, pen, parts, after)

    def scaled(self, value, scale):
        return value * ops.cast(scale, value.dtype) if self.precision == "fp16" else value

    def penalty(self, tv, anchors):
        """L2-SP: alpha/2 ||w - w0||^2 over trainable backbone weights, beta/2 ||w||^2 over the head."""
        alpha, beta = self.reg
        total = None
        for s, v in zip(self.slots, tv):
            if s.name.startswith("backbone."):
                term = (alpha / 2) * ops.sum(ops.square(v - anchors[s.name]))
            else:
                term = (beta / 2) * ops.sum(ops.square(v))
            total = term if total is None else total + term
        return total

    def find_reached(self, tv, ov, anchors, x, y) -> tuple:
        """Which parameters have a path to the loss: TensorFlow's tape gives the others no
        gradient, and torch no .grad, so neither updates them (weight decay, momentum)."""
        closed = jax.make_jaxpr(lambda tv: self.objective(tv, ov, anchors, x, y)[0])(tv)
        used = set()
        for eqn in reversed(closed.jaxpr.eqns):     # a backward sweep from the loss
            if any(isinstance(o, jcore.Var) and (o in used or o in closed.jaxpr.outvars)
                   for o in eqn.outvars):
                used.update(v for v in eqn.invars if isinstance(v, jcore.Var))
        used.update(v for v in closed.jaxpr.outvars if isinstance(v, jcore.Var))
        return tuple(v in used for v in closed.jaxpr.invars)

    def build(self):
        if self.parallel is not None:
            return parallel_jax.build_step(self, self.parallel)

        def step(tv, ov, bufs, anchors, x, y, rows, scaling):
            self.compiled.traces += 1       # runs while jit traces, not on each call
            (_, (loss, pen, parts, after)), grads = jax.value_and_grad(
                self.objective, has_aux=True)(tv, ov, anchors, x, y, scaling[0])
            new_tv, new_bufs, scaling, applied = self.finish(tv, grads, bufs, rows, scaling)
            return new_tv, after, new_bufs, loss, pen, parts, scaling, applied
        return jax.jit(step)

    def finish(self, tv, grads, bufs, rows, scaling):
        """The update; fp16: torch.amp.GradScaler's rules as training.py's _apply_scaled (the
        gradients unscaled; inf/NaN ones skip the update and halve the scale; GROWTH_INTERVAL
        good steps double it). Returns (values, optimizer state, scaling, applied)."""
        if self.precision != "fp16":
            return (*self.apply(tv, grads, bufs, rows), scaling, jnp.asarray(True))
        scale, good = scaling
        grads = [g / ops.cast(scale, g.dtype) for g in grads]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
        new_tv, new_bufs = self.apply(tv, grads, bufs, rows)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        good = jnp.where(finite, good + 1, 0)
        grow = good >= GROWTH_INTERVAL
        scale = jnp.where(finite, jnp.where(grow, scale * 2.0, scale), scale * 0.5)
        return keep(new_tv, tv), keep(new_bufs, bufs), (scale, jnp.where(grow, 0, good)), finite

    def apply(self, tv, grads, bufs, rows):
        """Every parameter the loss reaches updated: (new values, new optimizer state)."""
        new_tv, new_bufs = [], []
        for i, (p, g, buf) in enumerate(zip(tv, grads, bufs)):
            if self.reached[i]:
                p, buf = self.update(p, g, buf, rows[i])
            new_tv.append(p)
            new_bufs.append(buf)
        return new_tv, new_bufs

    def update(self, p, g, buf, row):
        """One parameter's update by tlbridge's formulas (tlbridge/optim.py), as training.py's
        _sgd and _adam; row = (lr, a, b, c) from Trainer._scalars."""
        cfg = self.cfg
        lr, a, b, c = row[0], row[1], row[2], row[3]
        if cfg.name == "sgd":
            if cfg.weight_decay:
                g = g + cfg.weight_decay * p
            if cfg.momentum:
                (mom,) = buf
                mom = ops.where(a > 0, g, mom * cfg.momentum + g)
                g = g + cfg.momentum * mom if cfg.nesterov else mom
                buf = (mom,)
            return p + (-lr) * g, buf
        b1, b2 = cfg.betas
        if cfg.name == "adamw" and cfg.weight_decay:
            p = p * c
        elif cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m_, v_ = buf
        m_ = m_ + (1 - b1) * (g - m_)
        v_ = v_ * b2 + (1 - b2) * g * g
        denom = ops.sqrt(v_) / b + cfg.eps
        return p + (-a) * (m_ / denom), (m_, v_)


class Trainer:
    """The Trainer of backends/contract.py on JAX: the same scalars, state layout and
    checkpoints as training.py's (TensorFlow), the step a jitted pure function: XLA-compiled
    whatever `compile` says (fine_tune(compile=True) is accepted and changes nothing)."""

    def __init__(self, m, cfg: OptimizerConfig, groups: list[tuple[float, list[str]]],
                 regularizer=None, anchors: dict | None = None, loss=None,
                 precision: str = "fp32", parallel=None, compile: bool = False):
        if precision == "bf16":
            _check_bf16(m.state.get("device", "cpu"))
        self.m, self.cfg, self.precision, self.parallel = m, cfg, precision, parallel
        self.loss = Loss() if loss is None else loss
        self.last_parts = None
        self.last_rows = None
        self.slots = {s.name: s for s in m.state["slots"] if s.is_param}
        self.group_of = {name: i for i, (_, names) in enumerate(groups) for name in names}
        self.compiled = _compiled(m)
        self.state = self.compiled.state
        self.steps: dict[str, int] = {}
        self.reg = None if regularizer is None else tuple(float(v) for v in regularizer)
        self._anchors_checked: set = set()
        self._zero_state()
        self.set_anchors(anchors or {})

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current loss scale (GradScaler's rules); None otherwise."""
        return float(self.compiled.scaling[0]) if self.precision == "fp16" else None

    def _zero_state(self) -> None:
        for table in self.state.values():
            for name, value in table.items():
                table[name] = ops.zeros_like(value)
        self.compiled.scaling = _start_scaling()

    def _buf(self, slot, s):
        table = self.state.setdefault(slot, {})
        if s.name not in table:
            table[s.name] = ops.zeros(tuple(s.variable.shape), dtype=self.m.dtype)
        return table[s.name]

    def set_anchors(self, anchors: dict) -> None:
        for n, a in anchors.items():
            value = np.ascontiguousarray(self.slots[n].from_canonical(np.asarray(a)), dtype=self.m.dtype)
            self.compiled.anchors[n] = ops.convert_to_tensor(value)
        self.anchored = frozenset(anchors)

    def _slot_names(self) -> tuple:
        if self.cfg.name == "sgd":
            return ("momentum_buffer",) if self.cfg.momentum else ()
        return ("exp_avg", "exp_avg_sq")

    def _scalars(self, names, lrs):
        """Per parameter (lr, a, b, c) as torch.optim computes them in Python floats (training.py)."""
        rows = []
        for name in names:
            lr = lrs[self.group_of[name]]
            t = self.steps.get(name, 0) + 1
            if self.cfg.name == "sgd":
                rows.append((lr, 1.0 if t == 1 else 0.0, 0.0, 0.0))
            else:
                b1, b2 = self.cfg.betas
                rows.append((lr, lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5, 1 - lr * self.cfg.weight_decay))
        return np.array(rows, dtype=np.float64).reshape(-1, 4).astype(self.m.dtype)

    def _check_anchors(self, key, names) -> None:
        if self.reg is not None and key not in self._anchors_checked:
            missing = [n for n in names if n.startswith("backbone.") and n not in self.anchored]
            if missing:     # the shared anchors would hold another run's values
                raise RuntimeError(f"L2-SP needs an anchor for every trainable backbone "
                                   f"parameter; none was set for {missing[:3]}.")
            self._anchors_checked.add(key)

    def _run(self, x, y, lrs, head_only):
        names = tuple(n for n in self.slots if n not in self.m.frozen)
        key = (names, head_only, self.cfg, self.reg, self.loss, self.precision, self.parallel)
        step = self.compiled.steps.get(key)
        if step is None:
            step = self.compiled.steps[key] = _Step(self, names, head_only)
        self._check_anchors(key, names)
        slots = self._slot_names()
        bufs = [tuple(self._buf(k, self.slots[n]) for k in slots) for n in names]
        anchors = {n: self.compiled.anchors[n] for n in names if n in self.compiled.anchors} \
            if self.reg is not None else {}
        tv, ov = _values(step.trainable), _values(step.others)
        with self._where():
            if step.fn is None:
                step.reached = step.find_reached(tv, ov, anchors, x, y)
                step.fn = step.build()
            if self.parallel is None:
                out = step.fn(tv, ov, bufs, anchors, x, y, self._scalars(names, lrs),
                              self.compiled.scaling)
                self.last_rows = (inputs.length(x),)
            else:
                *batch, self.last_rows = parallel_jax.inputs_of(
                    self.parallel, x, y, self.loss.name == "multi")
                xs, ys, mask, count = batch
                tv, ov, bufs, anchors, scaling = parallel_jax.replicated(
                    self.parallel, (tv, ov, bufs, anchors, self.compiled.scaling))
                out = step.fn(tv, ov, bufs, anchors, xs, ys, self._scalars(names, lrs), scaling,
                              mask, count)
            new_tv, after, new_bufs, loss, pen, parts, self.compiled.scaling, applied = out
        _write(step.trainable, new_tv)
        _write(step.others, after)
        for n, buf in zip(names, new_bufs):
            for k, value in zip(slots, buf):
                self.state[k][n] = value
        if self.loss.name == "multi":
            self.last_parts = np.asarray(parts, np.float64)
        if bool(applied):                   # fp16: a step skipped for inf/NaN counts no update
            for n in names:
                self.steps[n] = self.steps.get(n, 0) + 1
        return float(loss), float(pen)

    def _where(self):
        """The model's device; replicas place their shares themselves (parallel_jax.spread)."""
        if self.parallel is not None:
            return contextlib.nullcontext()
        return device_scope(self.m.state.get("device", "cpu"))

    def step(self, x, y, lrs):
        return self._run(x, y, lrs, head_only=False)

    def head_step(self, f, y, lrs):
        return self._run(f, y, lrs, head_only=True)

    def end_epoch(self) -> None:
        """Nothing to undo: Keras takes training=True per call."""

    def close(self) -> None:
        """Nothing to release (the jitted steps stay with the model)."""

    # -- checkpoints: training.py's layout, so either engine resumes the other's -----------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for slot in self.cfg.slots:
            for name, value in self.state.get(slot, {}).items():
                if self.steps.get(name, 0):
                    out[f"{slot}/{name}"] = np.asarray(self.slots[name].to_canonical(np.asarray(value)))
        for name, t in self.steps.items():
            out[f"step/{name}"] = np.asarray(float(t), dtype=np.float32)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.steps = {}
        self._zero_state()
        for key, value in state.items():
            slot, name = key.split("/", 1)
            if slot == "step":
                self.steps[name] = int(round(float(np.asarray(value).reshape(-1)[0])))
            else:
                s = self.slots[name]
                self.state.setdefault(slot, {})[name] = ops.convert_to_tensor(
                    np.ascontiguousarray(s.from_canonical(np.asarray(value)), dtype=self.m.dtype))
        for key in state:   # older torch checkpoints hold SGD buffers without a step count
            slot, name = key.split("/", 1)
            if slot != "step" and name not in self.steps:
                self.steps[name] = 1


# -- devices and replicas -------------------------------------------------------------------
def _jax_devices(kind: str) -> list:
    try:
        return jax.devices(kind)
    except RuntimeError:        # no such platform on this machine
        return []


def _check_bf16(device: str) -> None:
    """bf16 on an NVIDIA GPU before Ampere: refused before the first step (devices.py's rule
    on TensorFlow)."""
    if not device.startswith("cuda"):
        return
    gpus, index = _jax_devices("gpu"), int(device.partition(":")[2] or 0)
    capability = str(getattr(gpus[index], "compute_capability", "8.0")) if index < len(gpus) else "8.0"
    if int(capability.split(".")[0]) < 8:
        from tlbridge.errors import DataError
        raise DataError(f"Expected a GPU with bfloat16 support (NVIDIA compute capability 8.0, "
                        f"Ampere, or newer) for precision='bf16'; received {device} with compute "
                        f"capability {capability}. Train with precision='fp16' (loss scaling) or "
                        f"'fp32'.")


def available() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(len(_jax_devices("gpu")))]


def resolve_device(device: str) -> str:
    have = available()
    if device == "auto":
        return next((d for d in have if d != "cpu"), "cpu")
    if device not in have:
        raise tl_devices.unavailable(device, have, "keras (JAX)")
    return device


def device_scope(device: str):
    kind, _, index = device.partition(":")
    found = _jax_devices("cpu" if kind == "cpu" else "gpu")
    if not found:
        return contextlib.nullcontext()
    return jax.default_device(found[int(index or 0)])


def to_device(m, device: str) -> bool:
    """Variables do not move: False (tlbridge/api.py rebuilds the model under
    device_scope(device)), unless it already lives on `device`."""
    return m.state.get("device", "cpu") == device


def set_tf32(enabled):
    """TF32 in float32 matmuls on a GPU: jax's default matmul precision; returns the previous
    setting (a bool, or the value restored)."""
    previous = jax.config.jax_default_matmul_precision
    if isinstance(enabled, bool):
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if enabled else "highest")
    else:
        jax.config.update("jax_default_matmul_precision", enabled)
    return previous


cpu_replicas = parallel_jax.cpu_replicas      # TLBRIDGE_CPU_REPLICAS=N: the same, from_env
from_env = parallel_jax.from_env
replica_plan = parallel_jax.plan


def _check_replica_batchnorm(model) -> None:
    """Keras' own BatchNormalization (keras.applications backbones) trains with its moments
    over the padded share on replicas: refused while it trains; frozen, it runs on its moving
    statistics and splits rows exactly."""
    training = [layer.name for layer in model._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if training:
        raise engine.not_yet(f"data-parallel replicas with Keras' own BatchNormalization "
                             f"trainable ({training[0]!r}, a keras.applications backbone; "
                             f"freeze the backbone, or use a portable one)")


def grow_gpu_memory() -> None:
    """JAX preallocates 75% of a GPU at its first use; XLA_PYTHON_CLIENT_PREALLOCATE=false (set
    before the first JAX array) leaves torch room (docs/keras-engines.md)."""


def export_model(m, path: str, format: str, outputs: tuple) -> None:
    raise engine.not_yet(f"tl.export(..., {format!r}) (Keras' exporters run on TensorFlow)")


def saved_model_runner(path: str):
    raise engine.not_yet("running a SavedModel (it needs TensorFlow)")

"""Training steps on Keras (TensorFlow), following tlbridge's optimizer formulas op for op
(see tlbridge/optim.py; Keras' own SGD and Adam use other formulas).

Each step is one compiled tf.function (forward, loss, gradients, updates) per set of trainable
parameters and loss. Per-parameter scalars (learning rate, bias corrections, "first step") are computed
in Python floats exactly as torch.optim computes them, and passed in as a vector.

Tracing a step costs seconds (a whole forward and backward graph), more than an epoch of a
small model, so the traced steps, the optimizer-state variables they update and the L2-SP
anchors live with the model (`m.state["_train"]`), not with one `fine_tune` call: a second
call, the next unfreeze phase seen again, or a resumed run reuses them instead of tracing
again. Every Trainer starts from zeroed state, so sharing the variables changes no number.
"""
from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from tlbridge.losses import Loss
from tlbridge.optim import OptimizerConfig

from . import devices, parallel as par
from .compute import constant, input_spec, loss_fn, multi_loss, task_counts
from .mixed import GROWTH_INTERVAL, INITIAL_SCALE, mixed_policy
from .seeds import seed_epoch  # noqa: F401  (moved: every engine shares it)


def warn_xla_on_cpu(m) -> None:
    """tl.compile(m) on the CPU with convolutions: XLA's CPU convolutions are far slower than
    TensorFlow's oneDNN kernels (benchmarks/compile_cost.py), so say so once instead of
    letting a run crawl silently; the run itself goes ahead as asked."""
    if not str(m.state.get("device", "cpu")).startswith("cpu"):
        return
    if any(isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
           for layer in m.native._flatten_layers(include_self=False)):
        warnings.warn("A compiled model (tl.compile) on the CPU: XLA runs convolutions far slower than "
                      "TensorFlow's own kernels (resnet18 at 64x64: 15-50x slower per step, "
                      "benchmarks/compile_cost.py). Expected a GPU for XLA to pay; pass "
                      "tl.compile(m, False) to train this convolutional model on the CPU.", stacklevel=2)


class _Compiled:
    """What one model keeps across Trainers: optimizer-state and anchor variables by name,
    and traced steps by (trainable names, head only, optimizer, regularizer)."""

    def __init__(self, m):
        self.dtype = m.dtype
        self.device = m.state.get("device", "cpu")     # state is created where the model lives
        self.state: dict[str, dict[str, tf.Variable]] = {}   # slot -> name -> Variable (Keras layout)
        self.anchors: dict[str, tf.Variable] = {}
        with devices.scope(self.device):
            self.loss_scale = tf.Variable(INITIAL_SCALE, dtype=tf.float32, trainable=False)
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.steps: dict[tuple, tf.types.experimental.PolymorphicFunction] = {}

    def var(self, table: dict, s) -> tf.Variable:
        """Optimizer state and L2-SP anchors on the model's device (else TensorFlow's default,
        GPU:0, whatever m.device says, and copied every step)."""
        if s.name not in table:
            with devices.scope(self.device):
                table[s.name] = tf.Variable(tf.zeros(s.variable.shape, dtype=self.dtype),
                                            trainable=False)
        return table[s.name]


def _compiled(m) -> _Compiled:
    if "_train" not in m.state:
        m.state["_train"] = _Compiled(m)
    return m.state["_train"]


def traced_steps(m) -> int:
    """How many step graphs have been traced for this model (a retrace check for tests)."""
    c = m.state.get("_train")
    if c is None:
        return 0
    return sum(int(f.experimental_get_tracing_count()) for f in c.steps.values())


def xla_steps(m) -> int:
    """How many traced step graphs are marked for XLA (tl.compile(m))."""
    c = m.state.get("_train")
    if c is None:
        return 0
    return sum(bool(cf.function_def.attr["_XlaMustCompile"].b)
               for f in c.steps.values() for cf in f._list_all_concrete_functions())


class _StepParts:
    """The pieces a traced step is made of (penalty, optimizer update, forward and loss, fp16
    loss scaling). It holds the model's variables and plain constants only, never the Trainer:
    the tf.function closes over it, and later Trainers of the same model run that function."""

    def __init__(self, trainer, names, head_only):
        m, compiled, cfg = trainer.m, trainer.compiled, trainer.cfg
        self.slots = [trainer.slots[n] for n in names]
        self.cfg, self.reg, self.loss_spec = cfg, trainer.reg, trainer.loss
        self.bufs = {}      # the optimizer-state variables, shared with the model's other steps
        for s in self.slots:
            if cfg.name == "sgd" and cfg.momentum:
                self.bufs[s.name] = (trainer._var("momentum_buffer", s),)
            elif cfg.name != "sgd":
                self.bufs[s.name] = (trainer._var("exp_avg", s), trainer._var("exp_avg_sq", s))
        self.anchors = {s.name: compiled.var(compiled.anchors, s) for s in self.slots
                        if self.reg is not None and s.name.startswith("backbone.")}
        self.model = m.state["head_model"] if head_only else m.native
        self.inputs = self.model.inputs[0] if head_only else m.state["inputs"]
        self.log_vars = m.state.get("log_vars")
        self.dtype = m.dtype
        self.variables = [s.variable.value for s in self.slots]
        self.precision = trainer.precision
        self.scale, self.good = compiled.loss_scale, compiled.good_steps
        self.multi = self.loss_spec.name == "multi"

    def signature(self) -> list:
        """Any batch size: one trace, also for a ragged last batch."""
        return [input_spec(self.inputs),      # one array, or a dict of named inputs
                tf.TensorSpec((None, *self.model.outputs[0].shape[1:]), self.dtype),
                tf.TensorSpec((len(self.slots), 4), self.dtype)]

    @contextlib.contextmanager
    def watching(self):
        """A tape that records the trainable variables only (not the frozen ones read)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for v in self.variables:
                tape.watch(v)
            yield tape

    # -- loss -----------------------------------------------------------------------------
    def penalty(self):
        """L2-SP: alpha/2 ||w - w0||^2 over trainable backbone weights, beta/2 ||w||^2 over the head."""
        alpha, beta = self.reg
        total = None
        for s in self.slots:
            v = s.variable.value
            if s.name.startswith("backbone."):
                term = (alpha / 2) * tf.reduce_sum(tf.square(v - self.anchors[s.name]))
            else:
                term = (beta / 2) * tf.reduce_sum(tf.square(v))
            total = term if total is None else total + term
        return total

    def forward_loss(self, x, y, rows=None, counts=None, first=None):
        """The loss (and multi-task per-task losses; empty otherwise), always in float32+, and
        the rows the forward pass computed (what this replica trained on)."""
        z = self.model(x, training=True)
        trained = tf.shape(z)[0]
        if self.precision != "fp32":
            z = tf.cast(z, self.dtype)            # the loss in float32
        if self.multi:
            return (*multi_loss(z, y, self.loss_spec, self.log_vars.value, counts, first),
                    trained)
        return loss_fn(z, y, self.loss_spec, rows=rows), tf.zeros((0,), z.dtype), trained

    def scaled(self, value):
        """fp16: the loss times the scale, inside the tape, so its gradient is recorded."""
        return value * tf.cast(self.scale, value.dtype) if self.precision == "fp16" else value

    def grads_of(self, tape, value):
        """The gradients of `value`, unscaled again under fp16."""
        grads = [None if g is None else tf.convert_to_tensor(g)     # embeddings: dense
                 for g in tape.gradient(value, self.variables)]
        if self.precision != "fp16":
            return grads
        return [None if g is None else g / tf.cast(self.scale, g.dtype) for g in grads]

    # -- updates --------------------------------------------------------------------------
    def update(self, s, g, row):
        """One parameter's update by tlbridge's formulas; row = (lr, a, b, c) from _scalars."""
        var, p = s.variable, s.variable.value
        lr, a, b, c = row[0], row[1], row[2], row[3]
        if self.cfg.name == "sgd":
            self._sgd(s, var, p, g, lr, a)
        else:
            self._adam(s, var, p, g, a, b, c)

    def _sgd(self, s, var, p, g, lr, a):
        """torch.optim.SGD: a > 0 on the first update, where the buffer starts as the gradient."""
        cfg = self.cfg
        if cfg.weight_decay:
            g = g + cfg.weight_decay * p
        if cfg.momentum:
            (buf,) = self.bufs[s.name]
            buf.assign(tf.where(a > 0, g, buf * cfg.momentum + g))
            g = g + cfg.momentum * buf if cfg.nesterov else buf.read_value()
        var.assign(p + (-lr) * g)

    def _adam(self, s, var, p, g, a, b, c):
        """torch.optim.Adam / AdamW with the bias corrections a, b (and c = 1 - lr * wd)."""
        cfg = self.cfg
        b1, b2 = cfg.betas
        if cfg.name == "adamw" and cfg.weight_decay:
            p = p * c
        elif cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m_, v_ = self.bufs[s.name]
        m_.assign(m_ + (1 - b1) * (g - m_))
        v_.assign(v_ * b2 + (1 - b2) * g * g)
        denom = tf.sqrt(v_) / b + cfg.eps
        var.assign(p + (-a) * (m_ / denom))

    def guard(self, loss, grads):
        """The loss, NaN where a gradient is inf/NaN (fp32/bf16): oneDNN's ReLU and max-pool
        turn NaN into 0, so NaN weights can leave the loss finite and training would go on
        silently; torch's loss goes NaN there, and so does this one (fp16 skips the step)."""
        if self.precision == "fp16":
            return loss
        return tf.where(_all_finite(grads), loss, tf.constant(float("nan"), loss.dtype))

    def apply(self, grads, rows):
        """Every parameter with a gradient updated; returns whether the step was applied
        (fp16 skips a step with inf/NaN gradients)."""
        def updates():
            for i, (s, g) in enumerate(zip(self.slots, grads)):
                if g is not None:
                    self.update(s, g, rows[i])
            return tf.constant(True)
        if self.precision != "fp16":
            return updates()
        return self._apply_scaled(grads, updates)

    def _apply_scaled(self, grads, updates):
        """fp16 dynamic loss scaling as torch.amp.GradScaler: finite gradients update and,
        after GROWTH_INTERVAL such steps, double the scale; inf/NaN skip and halve it."""
        scale, good = self.scale, self.good
        finite = _all_finite(grads)

        def ok():
            updates()
            good.assign_add(1)
            grow = good >= GROWTH_INTERVAL
            scale.assign(tf.where(grow, scale * 2.0, scale))
            good.assign(tf.where(grow, tf.constant(0, tf.int64), good))
            return tf.constant(True)

        def skip():         # inf/NaN gradients: no update, the scale halves
            scale.assign(scale * 0.5)
            good.assign(0)
            return tf.constant(False)
        return tf.cond(finite, ok, skip)


def _all_finite(grads):
    """Whether every gradient is finite, from one sum per tensor: a sum is inf or NaN if any of
    its terms is (or if it overflows, past ~3e38 in float32: counted as not finite). Half the
    cost of is_finite + reduce_all, which writes a bool tensor per gradient: that was 4% of a
    MiniLM step (docs/speed.md)."""
    return tf.reduce_all([tf.math.is_finite(tf.reduce_sum(g)) for g in grads if g is not None])


def _single_device_step(p: _StepParts, jit: bool = False):
    """One device: forward, loss and L2-SP penalty, gradients and updates in one graph;
    jit: that graph compiled whole by XLA (tl.compile(m)), once per batch shape."""
    @tf.function(input_signature=p.signature(), autograph=False, jit_compile=jit)
    def step(x, y, rows):
        with mixed_policy(p.model, p.precision):
            with p.watching() as tape:
                loss, parts, trained = p.forward_loss(x, y)
                pen = p.penalty() if p.reg is not None and p.slots else tf.constant(0.0, loss.dtype)
                total = p.scaled(loss + pen)
            grads = p.grads_of(tape, total)
        applied = p.apply(grads, rows)
        return p.guard(loss, grads), pen, parts, applied, tf.reshape(trained, [1])
    return step


def _mirrored_step(p: _StepParts, plan):
    """MirroredStrategy: each replica's share of the global batch's loss and gradients,
    summed over replicas; the penalty counted once beside them, the updates made once."""
    strategy, total_op = plan.strategy, tf.distribute.ReduceOp.SUM

    def replica_step(x, y):
        ctx = tf.distribute.get_replica_context()
        counts = task_counts(y, p.loss_spec) if p.multi else None    # of the global batch
        first = tf.cast(par.first_replica(ctx), y.dtype) if p.multi else None
        with p.watching() as tape:
            loss, parts, trained = p.forward_loss(par.share(x, ctx), par.share(y, ctx),
                                                  par.rows(x), counts, first)
            total = p.scaled(loss)
        grads = p.grads_of(tape, total)
        return loss, parts, trained, [tf.zeros_like(v) if g is None else g
                                      for v, g in zip(p.variables, grads)]

    @tf.function(input_signature=p.signature(), autograph=False)
    def step(x, y, rows):
        with mixed_policy(p.model, p.precision), par.tracing(plan.bn_sync), \
                par.keras_batchnorm(p.model, plan.bn_sync):
            loss, parts, trained, grads = strategy.run(replica_step, args=(x, y))
        trained = tf.stack(strategy.experimental_local_results(trained))   # per replica
        loss = strategy.reduce(total_op, loss, axis=None)
        grads = [strategy.reduce(total_op, g, axis=None) for g in grads]
        if p.multi:     # the task losses summed over replicas; NaN for a task absent
            parts = strategy.reduce(total_op, parts, axis=None)
            parts = tf.where(task_counts(y, p.loss_spec) > 0, parts,
                             tf.fill(tf.shape(parts), tf.constant(float("nan"), y.dtype)))
        else:
            parts = tf.zeros((0,), loss.dtype)
        pen = tf.constant(0.0, loss.dtype)
        if p.reg is not None and p.slots:       # counted once, beside the summed shares
            with p.watching() as tape:
                pen = p.penalty()
            grads = [g if pg is None else g + pg
                     for g, pg in zip(grads, tape.gradient(pen, p.variables))]
        applied = p.apply(grads, rows)
        return p.guard(loss, grads), pen, parts, applied, trained
    return step


class Trainer:
    def __init__(self, m, cfg: OptimizerConfig, groups: list[tuple[float, list[str]]],
                 regularizer=None, anchors: dict | None = None, loss=None,
                 precision: str = "fp32", parallel=None, compile: bool = False):
        self.m = m
        self.cfg = cfg
        self.precision = precision
        self.jit = bool(compile)        # XLA; data-parallel + compile is refused in tlbridge
        if self.jit:
            warn_xla_on_cpu(m)
        if precision == "bf16":
            devices.check_bf16(m.state.get("device", "cpu"))
        self.parallel = parallel        # tlbridge.parallel.Plan with its MirroredStrategy
        self.loss = Loss() if loss is None else loss
        self.last_parts = None          # multi-task: the last step's per-task losses
        self.last_rows = None           # the rows each replica's forward pass trained on
        self.slots = {s.name: s for s in m.state["slots"] if s.is_param}
        self.group_of = {name: i for i, (_, names) in enumerate(groups) for name in names}
        self.compiled = _compiled(m)
        self.state = self.compiled.state                       # slot -> name -> Variable
        self.steps: dict[str, int] = {}                       # updates so far, per parameter
        self.reg = None if regularizer is None else tuple(float(v) for v in regularizer)
        self._anchors_checked: set = set()
        self._zero_state()
        self.set_anchors(anchors or {})

    def _zero_state(self) -> None:
        for table in self.state.values():
            for var in table.values():
                var.assign(tf.zeros_like(var))
        self.compiled.loss_scale.assign(INITIAL_SCALE)
        self.compiled.good_steps.assign(0)

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current loss scale (GradScaler's rules); None otherwise."""
        return float(self.compiled.loss_scale.numpy()) if self.precision == "fp16" else None

    def set_anchors(self, anchors: dict) -> None:
        for n, a in anchors.items():
            value = np.ascontiguousarray(self.slots[n].from_canonical(np.asarray(a)), dtype=self.m.dtype)
            self.compiled.var(self.compiled.anchors, self.slots[n]).assign(value)
        self.anchored = frozenset(anchors)

    # -- state ---------------------------------------------------------------------------
    def _var(self, slot, s):
        return self.compiled.var(self.state.setdefault(slot, {}), s)

    def _scalars(self, names, lrs):
        """Per parameter (lr, a, b) as torch.optim computes them in Python floats:
        sgd: a = 1.0 on the first update (the buffer starts as the gradient);
        adam(w): a = lr / (1 - b1^t), b = sqrt(1 - b2^t); adamw also c = 1 - lr * wd."""
        rows = []
        for name in names:
            lr = lrs[self.group_of[name]]
            t = self.steps.get(name, 0) + 1
            if self.cfg.name == "sgd":
                rows.append((lr, 1.0 if t == 1 else 0.0, 0.0, 0.0))
            else:
                b1, b2 = self.cfg.betas
                rows.append((lr, lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5, 1 - lr * self.cfg.weight_decay))
        return tf.constant(np.array(rows, dtype=np.float64).reshape(-1, 4), dtype=self.m.dtype)

    # -- the compiled step ----------------------------------------------------------------
    def _build(self, names, head_only):
        """The step as a tf.function that closes over variables and constants only (never over
        this Trainer), so later Trainers of the same model can run it."""
        parts = _StepParts(self, names, head_only)
        if self.parallel is None:
            return _single_device_step(parts, self.jit)
        return _mirrored_step(parts, self.parallel)

    def _run(self, x, y, lrs, head_only):
        names = tuple(n for n in self.slots if n not in self.m.frozen)
        key = (names, head_only, self.cfg, self.reg, self.loss, self.precision, self.parallel,
               self.jit)
        steps = self.compiled.steps
        if key not in steps:
            steps[key] = self._build(names, head_only)
        if self.reg is not None and key not in self._anchors_checked:
            missing = [n for n in names if n.startswith("backbone.") and n not in self.anchored]
            if missing:     # the shared anchor variables would hold another run's values
                raise RuntimeError(f"L2-SP needs an anchor for every trainable backbone "
                                   f"parameter; none was set for {missing[:3]}.")
            self._anchors_checked.add(key)
        rows = self._scalars(names, lrs)
        where = (contextlib.nullcontext() if self.parallel is not None
                 else devices.scope(self.m.state.get("device", "cpu")))
        with where:
            loss, reg, parts, applied, trained = steps[key](constant(x), tf.constant(y), rows)
        self.last_rows = tuple(int(v) for v in np.asarray(trained))
        if self.loss.name == "multi":
            self.last_parts = np.asarray(parts, np.float64)
        if bool(applied):                   # fp16: a step skipped for inf/NaN counts no update
            for n in names:
                self.steps[n] = self.steps.get(n, 0) + 1
        return float(loss), float(reg)

    def step(self, x, y, lrs):
        return self._run(x, y, lrs, head_only=False)

    def head_step(self, f, y, lrs):
        return self._run(f, y, lrs, head_only=True)

    def end_epoch(self) -> None:
        """Nothing to undo: Keras takes training=True per call."""

    def close(self) -> None:
        """Nothing to release (the traced steps stay with the model)."""

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for slot in self.cfg.slots:     # the tables are shared with earlier Trainers' optimizers
            for name, var in self.state.get(slot, {}).items():
                if self.steps.get(name, 0):
                    out[f"{slot}/{name}"] = np.asarray(self.slots[name].to_canonical(var.numpy()))
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
                self._var(slot, s).assign(np.ascontiguousarray(s.from_canonical(np.asarray(value)),
                                                               dtype=self.m.dtype))
        for key in state:   # older torch checkpoints hold SGD buffers without a step count:
            slot, name = key.split("/", 1)   # a buffer means at least one update was made
            if slot != "step" and name not in self.steps:
                self.steps[name] = 1

"""Data-parallel training on Keras' JAX engine: N replicas over N devices (GPUs, or CPU devices
that cpu_replicas / TLBRIDGE_CPU_REPLICAS make: jax_num_cpu_devices, set before JAX starts).

The step is one jax.jit around a `jax.shard_map` over a one-axis Mesh ("replica"): the global
batch is laid out share by share (tlbridge/parallel.py's shard_bounds), each share padded to
the largest one with copies of row 0 and a 0/1 row mask, so a ragged batch (7 rows: 4/3) needs
no uneven sharding. Each replica computes its share's loss (its sum over the *global* count)
and gradients; `psum` adds them, as tf.distribute's all-reduce does in parallel.py, and one
update follows in the jitted step. TorchBatchNorm inside a replica (batch_norm_in_replica)
normalises over the masked rows of every share (bn_sync="global": sums and count psum-ed, in
the forward and in the closed-form backward) or of its own share ("local"); the moving
statistics (and every other state variable) are replica 0's, as on TensorFlow and torch DDP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from keras import ops

from tlbridge import inputs, parallel
from tlbridge.errors import DistributedError

AXIS = "replica"
ENV = parallel.CPU_REPLICAS_ENV
_CTX: dict = {"ctx": None}


@dataclass(frozen=True)
class ReplicaContext:
    """What a layer traced inside a replica needs: bn_sync and this share's row mask."""
    bn_sync: str
    mask: object            # (rows,) 1.0 for this share's rows, 0.0 for its padding


def replica_context():
    return _CTX["ctx"]


@contextlib.contextmanager
def tracing(ctx: ReplicaContext):
    previous = _CTX["ctx"]
    _CTX["ctx"] = ctx
    try:
        yield
    finally:
        _CTX["ctx"] = previous


# -- devices --------------------------------------------------------------------------------
def _started() -> bool:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def cpu_replicas(n: int) -> list[str]:
    """n CPU devices for replicas=n (jax_num_cpu_devices, as XLA_FLAGS=
    --xla_force_host_platform_device_count=n); must run before JAX starts its backends (the
    first model or array). Returns their names."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistributedError(f"Expected cpu_replicas(n) with an int n >= 1; received {n!r}.")
    if not _started():
        jax.config.update("jax_num_cpu_devices", n)
    have = jax.devices("cpu")
    if len(have) != n:
        raise DistributedError(
            f"Expected cpu_replicas({n}) before JAX starts its devices; received a JAX already "
            f"running with {len(have)} CPU device(s). Call tl.backends.keras.cpu_replicas({n}) "
            f"first thing in the script, or set {ENV}={n} before importing tlbridge.")
    return [str(d) for d in have]


def from_env() -> None:
    n = parallel.cpu_replicas_from_env()
    if n is not None:
        cpu_replicas(n)


def _devices(kind: str) -> list:
    try:
        return jax.devices(kind)
    except RuntimeError:
        return []


def devices_for(n: int) -> list:
    """GPUs when there are n of them; else CPU devices, when there are n (parallel.py's rule)."""
    return parallel.replica_pool(_devices("gpu"), _devices("cpu"), n, "JAX")


def plan(replicas, bn_sync: str) -> parallel.Plan:
    if isinstance(replicas, Mesh):
        if replicas.axis_names != (AXIS,):
            raise DistributedError(f"Expected replicas as an int or a one-axis jax Mesh named "
                                   f"({AXIS!r},); received a Mesh over {replicas.axis_names}.")
        mesh = replicas
    else:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise DistributedError(f"Expected replicas as an int >= 1 or a jax Mesh; received "
                                   f"{replicas!r}.")
        mesh = Mesh(np.array(devices_for(replicas)), (AXIS,))
    return parallel.Plan(int(mesh.devices.size), 0, bn_sync, mesh)


# -- the global batch, share by share -------------------------------------------------------
def layout(n: int, world: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(row index per slot, 0/1 mask per slot, rows per replica): replica r's slots hold its
    shard_bounds rows, then copies of row 0 up to the largest share's size."""
    size = max(1, -(-n // world))
    index, mask, sizes = [], [], []
    for r in range(world):
        a, b = parallel.shard_bounds(n, world, r)
        index += list(range(a, b)) + [0] * (size - (b - a))
        mask += [1.0] * (b - a) + [0.0] * (size - (b - a))
        sizes.append(b - a)
    return np.array(index), np.array(mask), tuple(sizes)


def spread(mesh, x, index):
    """x's rows in layout order, placed share by share on the mesh's devices."""
    where = NamedSharding(mesh, P(AXIS))
    if isinstance(x, dict):
        return {k: spread(mesh, v, index) for k, v in x.items()}
    return jax.device_put(np.asarray(x)[index], where)


def padded_labels(y, mask, multi: bool):
    """Labels in layout order; a multi-task batch's padding is missing labels (NaN), so the
    task counts of the global batch count real rows only."""
    if multi:
        y = np.array(y, dtype=y.dtype, copy=True)
        y[mask == 0] = np.nan
    return y


# -- BatchNorm inside a replica -------------------------------------------------------------
def batch_norm_in_replica(layer, x, ctx: ReplicaContext, batch_norm_train):
    """TorchBatchNorm's train-mode pass in a replica: the statistics over the masked rows of
    every share ("global") or this one ("local"), as parallel.py's on TensorFlow."""
    mean, var, y, n = _masked_batch_norm(x, ops.copy(layer.gamma.value),
                                         ops.copy(layer.beta.value), layer.epsilon, ctx,
                                         layer.accumulator(x))
    unbiased = var * (n / ops.maximum(n - 1.0, 1.0))
    m = layer.momentum
    layer.moving_mean.assign((1.0 - m) * layer.moving_mean + m * mean)
    layer.moving_variance.assign((1.0 - m) * layer.moving_variance + m * unbiased)
    return y


def _masked_batch_norm(x, gamma, beta, epsilon, ctx, acc="float64"):
    """network._batch_norm_train over the rows the mask keeps (TorchBatchNorm.accumulator's sums;
    closed-form backward); "global" psums the sums and the count in both passes. The
    gradients of gamma and beta stay this replica's share (the step psums every gradient once)."""
    axes = tuple(range(len(x.shape) - 1))
    together = ctx.bn_sync == "global"

    def total(t):
        return jax.lax.psum(t, AXIS) if together else t
    rows = ops.reshape(ops.cast(ctx.mask, acc), (-1,) + (1,) * (len(x.shape) - 1))
    mask_x = ops.cast(rows, x.dtype)
    x_const = ops.cast(ops.stop_gradient(x), acc)
    per_row = float(np.prod(x.shape[1:-1]))
    sums = total(ops.concatenate([ops.sum(x_const * rows, axis=axes),
                                  ops.sum(ops.cast(ctx.mask, acc))[None] * per_row], 0))
    n = sums[-1]
    mean64 = sums[:-1] / n
    var64 = total(ops.sum(ops.square((x_const - mean64) * rows), axis=axes)) / n
    mean, var = ops.cast(mean64, x.dtype), ops.cast(var64, x.dtype)
    invstd = ops.rsqrt(var + epsilon)
    n_x = ops.cast(n, x.dtype)

    @ops.custom_gradient
    def normalize(x, gamma, beta):
        xc = x - mean
        y = xc * (invstd * gamma) + beta

        def grad(*args, upstream=None):
            dy = (args[0] if upstream is None else upstream) * mask_x
            dbeta = ops.sum(ops.cast(dy, acc), axis=axes)
            dotp = ops.sum(ops.cast(dy * xc, acc), axis=axes)
            c = int(x.shape[-1])
            both = ops.cast(total(ops.concatenate([dbeta, dotp], 0)), x.dtype)
            k = both[c:] * invstd * invstd / n_x
            dx = (dy - both[:c] / n_x - xc * k) * (invstd * gamma) * mask_x
            return dx, ops.cast(dotp, x.dtype) * invstd, ops.cast(dbeta, x.dtype)

        return y, grad

    return mean, var, normalize(x, gamma, beta), n_x


# -- the step -------------------------------------------------------------------------------
def build_step(step, plan: parallel.Plan):
    """A jitted data-parallel step with engine_jax._Step's signature plus (mask, count): the
    replicas' summed loss and gradients (fp16: scaled), the L2-SP penalty once beside them,
    one update (engine_jax._Step.finish)."""
    mesh, multi = plan.strategy, step.loss_spec.name == "multi"
    sharded = jax.shard_map(_replica_fn(step, plan.bn_sync), mesh=mesh,
                            in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(), P(), P()),
                            out_specs=P(), check_vma=False)

    def run(tv, ov, bufs, anchors, x, y, rows, scaling, mask, count):
        step.compiled.traces += 1       # runs while jit traces, not on each call
        counts = step.task_counts(y) if multi else jnp.zeros((0,), y.dtype)
        loss, parts, grads, after = sharded(tv, ov, x, y, mask, count, counts, scaling[0])
        if multi:       # the task losses summed over replicas; NaN for a task absent
            parts = jnp.where(counts > 0, parts, jnp.full_like(parts, jnp.nan))
        pen = jnp.zeros((), loss.dtype)
        if step.reg is not None and step.slots:     # counted once, beside the summed shares
            pen, pen_grads = jax.value_and_grad(
                lambda tv: step.scaled(step.penalty(tv, anchors), scaling[0]))(tv)
            pen = pen / ops.cast(scaling[0], pen.dtype) if step.precision == "fp16" else pen
            grads = [g + pg for g, pg in zip(grads, pen_grads)]
        new_tv, new_bufs, scaling, applied = step.finish(tv, grads, bufs, rows, scaling)
        return new_tv, after, new_bufs, loss, pen, parts, scaling, applied
    return jax.jit(run)


def _replica_fn(step, bn_sync: str):
    def replica(tv, ov, x, y, mask, count, counts, scale):
        first = ops.cast(jax.lax.axis_index(AXIS) == 0, y.dtype)
        ctx = ReplicaContext(bn_sync, mask)

        def objective(tv):
            with tracing(ctx):
                (loss, parts), after = step.run_loss(
                    tv, ov, x, y, rows=count, mask=mask, counts=counts, first=first)
            return step.scaled(loss, scale), (loss, parts, after)
        (_, (loss, parts, after)), grads = jax.value_and_grad(objective, has_aux=True)(tv)

        def psum(t):
            return jax.lax.psum(t, AXIS)
        kept = [psum(jnp.where(first > 0, a, jnp.zeros_like(a))) for a in after]
        return psum(loss), psum(parts), [psum(g) for g in grads], kept
    return replica


def replicated(plan, tree):
    """Values on every device of the mesh: the same placement each step (jit retraces when
    an input's placement changes, as from the model's device to the mesh after step one)."""
    return jax.device_put(tree, NamedSharding(plan.strategy, P()))


def inputs_of(plan, x, y, multi: bool):
    """(x, y, mask, global count, rows per replica) of a global batch for build_step's fn."""
    n = inputs.length(x)
    index, mask, sizes = layout(n, plan.world)
    y = padded_labels(np.asarray(y)[index], mask, multi)
    mesh = plan.strategy
    dtype = y.dtype if np.issubdtype(y.dtype, np.floating) else np.float64
    return (spread(mesh, x, index), jax.device_put(y, NamedSharding(mesh, P(AXIS))),
            jax.device_put(mask.astype(dtype), NamedSharding(mesh, P(AXIS))),
            np.asarray(n, dtype), sizes)

"""Data-parallel training on tf.distribute (MirroredStrategy over GPUs or logical CPU devices).

The model's variables stay plain (they are not rebuilt under the strategy's scope): each step
runs the forward and backward pass of every replica's share with `strategy.run`, sums the
gradients and loss shares with `strategy.reduce` (the strategy's all-reduce), and applies one
update in cross-replica context, the same formulas as one process. BatchNorm statistics are
summed across replicas with the replica context's `all_reduce` (bn_sync="global"); running
statistics are written by replica 0 alone, from the global statistics ("global") or from its
own share ("local": torch DDP's rank-0 buffers, so both backends mean the same thing).

Keras' own BatchNormalization (keras.applications backbones) follows the same two rules
while a replica step is traced (keras_batchnorm): "global" turns on its `synchronized`
moments, and its moving-statistic writes are made replica 0's alone.
"""
from __future__ import annotations

import contextlib

import keras
from keras import ops
import tensorflow as tf

from tlbridge import parallel
from tlbridge.errors import DistributedError

_SYNC = {"mode": None}          # the bn_sync of the step being traced (None: one replica)
ENV = parallel.CPU_REPLICAS_ENV


def cpu_replicas(n: int) -> list[str]:
    """Split the CPU into n logical devices for replicas=n; must run before TensorFlow
    initialises its devices (before the first model or tensor). Returns their names."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistributedError(f"Expected cpu_replicas(n) with an int n >= 1; received {n!r}.")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == n:
            return [d.name for d in tf.config.list_logical_devices("CPU")]
        raise DistributedError(
            f"Expected cpu_replicas({n}) before TensorFlow initialises; received a TensorFlow "
            f"already running with {have} logical CPU device(s). Call "
            f"tl.backends.keras.cpu_replicas({n}) first thing in the script, or set "
            f"{ENV}={n} before importing tlbridge.") from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def from_env() -> None:
    n = parallel.cpu_replicas_from_env()
    if n is not None:
        cpu_replicas(n)


def devices_for(n: int) -> list[str]:
    """GPUs when there are n of them; else the logical CPUs cpu_replicas split, when there are
    n of those (a 1-GPU machine runs replicas=2 on cpu_replicas(2))."""
    return parallel.replica_pool([d.name for d in tf.config.list_logical_devices("GPU")],
                                 [d.name for d in tf.config.list_logical_devices("CPU")], n,
                                 "TensorFlow")


def plan(replicas, bn_sync: str) -> parallel.Plan:
    if isinstance(replicas, tf.distribute.Strategy):
        if not isinstance(replicas, tf.distribute.MirroredStrategy):
            raise DistributedError(f"Expected replicas as an int or a "
                                   f"tf.distribute.MirroredStrategy; received "
                                   f"{type(replicas).__name__}.")
        strategy = replicas
    else:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise DistributedError(f"Expected replicas as an int >= 1 or a "
                                   f"tf.distribute.MirroredStrategy; received {replicas!r}.")
        strategy = strategy_for(devices_for(replicas))
    return parallel.Plan(strategy.num_replicas_in_sync, 0, bn_sync, strategy)


_STRATEGIES: dict[tuple, tf.distribute.MirroredStrategy] = {}


def strategy_for(devices: list[str]) -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy per set of devices for the whole process: every fine_tune call
    (and a user's keras.fit in the same process) then shares its collective keys; two
    strategies over the same devices would number their all-reduces alike and collide."""
    key = tuple(devices)
    if key not in _STRATEGIES:
        _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(devices))
    return _STRATEGIES[key]


@contextlib.contextmanager
def tracing(bn_sync):
    previous = _SYNC["mode"]
    _SYNC["mode"] = bn_sync
    try:
        yield
    finally:
        _SYNC["mode"] = previous


def replica_context():
    """The replica context of a step being traced for several replicas, else None."""
    if _SYNC["mode"] is None:
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def bn_sync() -> str | None:
    return _SYNC["mode"]


@contextlib.contextmanager
def keras_batchnorm(model, bn_sync: str):
    """Keras BatchNormalization layers under replicas, while a step is traced.

    "global": Keras' own `synchronized=True` moments (the sums of x and x^2 and the count
    all-reduced over replicas, differentiably: the global batch's mean and biased variance,
    as E[x^2] - E[x]^2). Moving statistics: written by replica 0 alone. Left to Keras, every
    replica's `assign` to the model's plain variables lands, one after the other (measured:
    under "local" the moving mean took replica 0's update, then replica 1's on top of it)."""
    layers = [layer for layer in model._flatten_layers(include_self=False)
              if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer, layer.synchronized) for layer in layers]
    patched = [v for layer in layers for v in layer.non_trainable_weights]
    try:
        for layer in layers:
            layer.synchronized = layer.synchronized or bn_sync == "global"
        for v in patched:       # the instance's own attribute shadows the class's method
            object.__setattr__(v, "assign", _first_replica_assign(v))
        yield
    finally:
        for layer, synchronized in saved:
            layer.synchronized = synchronized
        for v in patched:
            object.__delattr__(v, "assign")


def _first_replica_assign(variable):
    """variable.assign, made in replica 0 only when called inside a replica step."""
    assign = type(variable).assign

    def first_only(value):
        ctx = replica_context()
        if ctx is None:
            return assign(variable, value)

        def write():
            assign(variable, value)
            return tf.constant(True)
        return tf.cond(first_replica(ctx), write, lambda: tf.constant(False))
    return first_only


def first_replica(ctx) -> tf.Tensor:
    return tf.equal(tf.cast(ctx.replica_id_in_sync_group, tf.int32), 0)


def rows(x):
    """The number of rows of a batch (a tensor, or a dict of them)."""
    return tf.shape(next(iter(x.values())) if isinstance(x, dict) else x)[0]


def share(x, ctx):
    """This replica's rows of the global batch x (tlbridge/parallel.py's shard_bounds); a
    dict of named inputs is shared input by input."""
    if isinstance(x, dict):
        return {k: share(v, ctx) for k, v in x.items()}
    n = tf.shape(x)[0]
    world = ctx.num_replicas_in_sync
    r = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    base, extra = n // world, n % world
    a = r * base + tf.minimum(r, extra)
    size = base + tf.cast(r < extra, tf.int32)
    return x[a:a + size]


def batch_norm_in_replica(layer, x, ctx, batch_norm_train):
    """TorchBatchNorm's train-mode pass inside a replica step: the statistics over every
    replica's rows (bn_sync="global") or this replica's; replica 0 alone writes the moving
    statistics (one update, no race between replicas)."""
    if bn_sync() == "global":
        mean, var, y, n = _batch_norm_train_global(
            x, tf.identity(layer.gamma.value), tf.identity(layer.beta.value), layer.epsilon, ctx,
            layer.accumulate)
    else:
        mean, var, y = batch_norm_train(x, tf.identity(layer.gamma.value),
                                        tf.identity(layer.beta.value), layer.epsilon,
                                        layer.accumulate)
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    unbiased = var * (n / tf.maximum(n - 1.0, 1.0))
    m = layer.momentum

    def update():
        layer.moving_mean.assign((1.0 - m) * layer.moving_mean + m * mean)
        layer.moving_variance.assign((1.0 - m) * layer.moving_variance + m * unbiased)
        return tf.constant(True)
    deps = tf.cond(first_replica(ctx), update, lambda: tf.constant(False))
    with tf.control_dependencies([deps]):
        return tf.identity(y)


def _batch_norm_train_global(x, gamma, beta, epsilon, ctx, acc="float64"):
    """_batch_norm_train over every replica's rows (data-parallel, bn_sync="global"): the
    replica context's all_reduce sums x and the row count, then the centred squares; the
    backward sums dy and dy * (x - mean) the same way and uses the global count. Returns
    (mean, biased variance, output, global count); acc as in _batch_norm_train."""
    axes = list(range(len(x.shape) - 1))
    total = tf.distribute.ReduceOp.SUM
    x_const = tf.cast(tf.stop_gradient(x), acc)
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), acc)
    sums = ctx.all_reduce(total, tf.concat([tf.reduce_sum(x_const, axis=axes), count[None]], 0))
    n = sums[-1]
    mean64 = sums[:-1] / n
    var64 = ctx.all_reduce(total, tf.reduce_sum(tf.square(x_const - mean64), axis=axes)) / n
    mean, var = tf.cast(mean64, x.dtype), tf.cast(var64, x.dtype)
    invstd = ops.rsqrt(var + epsilon)
    n_x = tf.cast(n, x.dtype)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        xc = x - mean
        y = xc * (invstd * gamma) + beta

        def grad(dy):
            dbeta = tf.reduce_sum(tf.cast(dy, acc), axis=axes)
            dotp = tf.reduce_sum(tf.cast(dy * xc, acc), axis=axes)
            both = tf.cast(ctx.all_reduce(total, tf.concat([dbeta, dotp], 0)), x.dtype)
            c = int(x.shape[-1])
            k = both[c:] * invstd * invstd / n_x
            dx = (dy - both[:c] / n_x - xc * k) * (invstd * gamma)
            return dx, tf.cast(dotp, x.dtype) * invstd, tf.cast(dbeta, x.dtype)

        return y, grad

    return mean, var, normalize(x, gamma, beta), n_x

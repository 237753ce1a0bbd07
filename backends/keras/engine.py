"""Which engine Keras runs on (Keras' own KERAS_BACKEND switch), for the layers that all engines
share: they ask here instead of importing an engine. The engine-specific code sits in
engine_tf.py (TensorFlow: tf.function steps, tf.distribute) and engine_jax.py (JAX: jax.jit of
value_and_grad over stateless calls)."""
from __future__ import annotations

import keras

from tlbridge.errors import EngineFeatureError

NAME = keras.backend.backend()
TENSORFLOW = NAME == "tensorflow"
LABEL = {"tensorflow": "TensorFlow", "jax": "JAX"}.get(NAME, NAME)


def replica_context():
    """The replica context of a step traced for several replicas (tf.distribute's on
    TensorFlow, parallel_jax.ReplicaContext inside a shard_map on JAX), else None."""
    if TENSORFLOW:
        from . import parallel
    else:
        from . import parallel_jax as parallel
    return parallel.replica_context()


def batch_norm_in_replica(layer, x, ctx, batch_norm_train):
    """TorchBatchNorm's train-mode pass inside a replica step, by the engine's collectives."""
    if TENSORFLOW:
        from . import parallel
    else:
        from . import parallel_jax as parallel
    return parallel.batch_norm_in_replica(layer, x, ctx, batch_norm_train)


def not_yet(feature: str) -> EngineFeatureError:
    """The error for a feature the JAX engine does not have yet."""
    return EngineFeatureError(
        f"Expected a feature Keras' {LABEL} engine supports in tlbridge; received a request for "
        f"{feature}, which is not available on Keras' {LABEL} engine yet. Use "
        f"KERAS_BACKEND=tensorflow (set before keras is imported) or the torch backend.")

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
    """The tf.distribute replica context of a step traced for several replicas, else None
    (always None on JAX, where data-parallel steps are not available yet)."""
    if not TENSORFLOW:
        return None
    from . import parallel
    return parallel.replica_context()


def not_yet(feature: str) -> EngineFeatureError:
    """The error for a feature the JAX engine does not have yet."""
    return EngineFeatureError(
        f"Expected a feature Keras' {LABEL} engine supports in tlbridge; received a request for "
        f"{feature}, which is not available on Keras' {LABEL} engine yet. Use "
        f"KERAS_BACKEND=tensorflow (set before keras is imported) or the torch backend.")

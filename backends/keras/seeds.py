"""Random streams of a Keras model, the same on every engine."""
from __future__ import annotations

import random

import keras
import numpy as np

from . import engine


def set_random_seed(seed: int) -> None:
    """keras.utils.set_random_seed, without TensorFlow on the other engines: Keras' own imports
    TensorFlow to seed it whenever TensorFlow is installed."""
    if engine.TENSORFLOW:
        keras.utils.set_random_seed(seed)
        return
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


def seed_epoch(m, seed: int) -> None:
    """Reset the model's own random streams (dropout, stochastic depth) from `seed`, so an
    epoch draws the same masks in every run of this backend (resumed runs included).

    Only the layers' SeedGenerator states are set: keras.utils.set_random_seed would also
    reseed TensorFlow globally, which clears TF's function caches and made the next step
    re-instantiate the whole compiled step (2 s per epoch on MobileNetV2, measured)."""
    k = 0
    for layer in m.native._flatten_layers(include_self=False):
        for sg in getattr(layer, "_seed_generators", ()):
            value = np.random.SeedSequence([seed, k]).generate_state(1)[0] % (2 ** 31)
            sg.state.assign(np.array([value, 0], dtype=sg.state.dtype))
            k += 1

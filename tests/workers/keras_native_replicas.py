"""keras.applications backbones (Keras' own BatchNormalization) on 2 Keras replicas, for
tests/test_distributed.py. Prints one JSON object of measured differences:

    python tests/workers/keras_native_replicas.py [BACKBONE]

Each run trains BACKBONE (default MobileNetV2, alpha 0.35, random weights, float64, 32x32) with
a 1-output head on 10 images, one global batch of 10 (no shuffling), 2 epochs, SGD:
  frozen  the backbone frozen (its BatchNorm on moving statistics): 2 replicas vs one process;
  global  everything trainable, bn_sync="global": 2 replicas vs one process;
  local   everything trainable, bn_sync="local", one step: 2 replicas vs the step written out
          by hand in one process (each half normalised on its own, the loss summed over both
          halves divided by 10, the moving statistics replica 0's update alone).
"""
from __future__ import annotations

import json
import sys

import numpy as np

LR = 0.05


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 32, 32, 3))
    y = (x[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]
    return x, y


def model(name):
    import tlbridge as tl
    options = {"alpha": 0.35} if name == "MobileNetV2" else {}
    m = tl.load_backbone(name, backend="keras", input_shape=(32, 32, 3), dtype="float64", seed=3,
                         **options)
    return tl.replace_head(m, 1, seed=4)


def train(name, replicas, bn_sync, frozen, epochs=2):
    import tlbridge as tl
    m = model(name)
    if frozen:
        tl.freeze(m, "backbone")
    x, y = data()
    ds = tl.data.arrays(x, y, batch_size=10, shuffle=False)
    tl.fine_tune(m, ds, epochs=epochs, optimizer=tl.optim.SGD(LR), progress=False,
                 feature_cache=False, parallel=tl.Parallel(replicas=replicas, bn_sync=bn_sync))
    return m


def max_diff(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def local_by_hand(name):
    """One SGD step (the first: momentum's buffer is the gradient) with each half of the batch
    normalised on its own, written out with Keras in one process; weights by canonical name."""
    import tensorflow as tf
    import tlbridge as tl
    m = model(name)
    x, y = data()
    net = m.native
    stats = list(net.non_trainable_weights)
    before = [v.numpy() for v in stats]
    with tf.GradientTape() as tape:
        z1 = net(tf.constant(x[5:]), training=True)        # replica 1's half: its stats dropped
        after_1 = [v.numpy() for v in stats]
        for v, b in zip(stats, before):
            v.assign(b)
        z0 = net(tf.constant(x[:5]), training=True)        # replica 0's half: kept
        z = tf.concat([z0, z1], 0)
        loss = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(tf.constant(y), z)) / 10
    grads = tape.gradient(loss, net.trainable_variables)
    for v, g in zip(net.trainable_variables, grads):
        v.assign(v - LR * g)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(after_1, before))
    return tl.get_weights(m), moved


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "MobileNetV2"
    from tlbridge.backends.keras import cpu_replicas
    cpu_replicas(2)
    import tlbridge as tl
    out = {}
    for run, bn_sync, frozen in (("frozen", "global", True), ("global", "global", False)):
        two = tl.get_weights(train(name, 2, bn_sync, frozen))
        one = tl.get_weights(train(name, None, bn_sync, frozen))
        start = tl.get_weights(model(name))
        out[run] = {"two_vs_one": max_diff(two, one), "trained": max_diff(one, start)}
    two = tl.get_weights(train(name, 2, "local", False, epochs=1))
    by_hand, replica1_moves = local_by_hand(name)
    one = tl.get_weights(train(name, None, "local", False, epochs=1))
    out["local"] = {"two_vs_by_hand": max_diff(two, by_hand), "two_vs_one": max_diff(two, one),
                    "replica1_would_move_stats": replica1_moves}
    import keras
    out["keras_batchnorm"] = sum(isinstance(layer, keras.layers.BatchNormalization)
                                 for layer in model(name).native._flatten_layers())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Adaptive fusion on Keras: frozen members side by side, and the gated head over them.

The twin of backends/torch/gate.py: the same composite (inputs -> u = [gate input | member
logits] -> gated head), with canonical names `backbone.members.<i>.*`,
`backbone.gate_backbone.*` and `head.gate.*`, so checkpoints and weights move between them.
"""
from __future__ import annotations

from dataclasses import replace

import keras
from keras import layers, ops

from tlbridge.specs import HeadSpec

from . import network, weights


@keras.saving.register_keras_serializable("tlbridge")
class EvalOnly(layers.Layer):
    """Runs a frozen sub-model in inference mode whatever the outer call's `training`: Keras 3
    lets an outer training=True override a training=False given when the graph was built,
    which would switch a member's dropout on."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, x, training=None):
        return self.model(x, training=False)


@keras.saving.register_keras_serializable("tlbridge")
class Columns(layers.Layer):
    """x[:, start:stop]."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), int(stop)

    def call(self, x):
        return x[:, self.start:self.stop]

    def get_config(self):
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable("tlbridge")
class GatedSum(layers.Layer):
    """softmax over members of the gate's logits, then the weighted sum of member logits."""

    def __init__(self, members, outputs, **kwargs):
        super().__init__(**kwargs)
        self.members, self.outputs = int(members), int(outputs)

    def call(self, inputs):
        a, zflat = inputs
        w = ops.softmax(a, axis=-1)
        z = ops.reshape(zflat, (-1, self.members, self.outputs))
        return ops.sum(ops.expand_dims(w, -1) * z, axis=1)

    def get_config(self):
        return {**super().get_config(), "members": self.members, "outputs": self.outputs}


def _renamed(slots, old: str, new: str):
    return [replace(s, name=new + s.name[len(old):]) for s in slots]


def build_gate(members: list, gate_on: str, gate_backbone=None):
    """The headless composite of member TransferModels (whose layers it shares)."""
    first = members[0]
    dtype = first.dtype
    inputs = keras.Input(shape=tuple(first.input_shape), dtype=dtype, name="images")
    feats, zs, slots, layer_list = [], [], [], []
    for i, m in enumerate(members):
        sub = keras.Model(m.state["inputs"], [m.state["feats"], m.native.outputs[0]],
                          name=f"member_{i}")
        f, z = EvalOnly(sub, name=f"members.{i}", dtype=dtype)(inputs)
        feats.append(f)
        zs.append(z)
        slots += _renamed(m.state["slots"], "", f"backbone.members.{i}.")
        layer_list += m.state["layers"]
    if gate_on == "logits":
        g = zs
    elif gate_on == "features":
        g = feats
    else:
        gb = gate_backbone.state["feature_model"]
        g = [EvalOnly(keras.Model(gb.inputs, gb.outputs, name="gate_backbone"),
                      name="gate_backbone", dtype=dtype)(inputs)]
        slots += _renamed(gate_backbone.state["slots"], "backbone.", "backbone.gate_backbone.")
        layer_list += gate_backbone.state["layers"]
    u = layers.Concatenate(dtype=dtype)([*g, *zs])
    k = first.num_outputs
    gate_dim = int(u.shape[-1]) - len(members) * k
    feature_model = keras.Model(inputs, u, name="fused_members")
    state = {"inputs": inputs, "feats": u, "feature_model": feature_model,
             "backbone_slots": slots, "slots": slots, "layers": layer_list,
             "feature_dim": int(u.shape[-1]),
             "gate": {"gate_dim": gate_dim, "members": len(members), "outputs": int(k)}}
    return feature_model, state


def attach_gate_head(m, head: HeadSpec):
    state = {k: v for k, v in m.state.items() if not k.startswith("_")}
    g = state["gate"]
    dtype = m.dtype
    mirror = network.Mirror(dtype)
    u = state["feats"]
    gate_in = Columns(0, g["gate_dim"], dtype=dtype)(u)
    zflat = Columns(g["gate_dim"], state["feature_dim"], dtype=dtype)(u)
    a = network.make_head(mirror, gate_in, HeadSpec(g["members"], head.hidden, head.dropout),
                          prefix="head.gate")
    logits = GatedSum(g["members"], g["outputs"], dtype=dtype)([a, zflat])
    model = keras.Model(state["inputs"], logits, name="fused_gate")
    state["head_model"] = keras.Model(u, logits, name="gated_head")
    state["slots"] = state["backbone_slots"] + weights.slots_for(mirror.entries)
    state["layers"] = state["layers"] + [layer for _, _, layer in mirror.entries]
    return model, state

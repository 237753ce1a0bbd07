"""Training steps on Keras (TensorFlow), following tlbridge's optimizer formulas op for op
(see tlbridge/optim.py; Keras' own SGD and Adam use other formulas)."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tlbridge.optim import OptimizerConfig


class Trainer:
    def __init__(self, m, cfg: OptimizerConfig, groups: list[tuple[float, list[str]]],
                 regularizer=None, anchors: dict | None = None):
        self.m = m
        self.cfg = cfg
        self.slots = {s.name: s for s in m.state["slots"] if s.is_param}
        self.group_of = {name: i for i, (_, names) in enumerate(groups) for name in names}
        self.state: dict[str, dict[str, tf.Variable]] = {}     # slot -> name -> tf.Variable (Keras layout)
        self.steps: dict[str, int] = {}
        self.reg = regularizer
        self.set_anchors(anchors or {})

    def set_anchors(self, anchors: dict) -> None:
        self.anchors = {n: tf.constant(np.ascontiguousarray(self.slots[n].from_canonical(np.asarray(a))),
                                       dtype=self.m.dtype) for n, a in anchors.items()}

    def _trainable(self):
        return [self.slots[n] for n in self.slots if n not in self.m.frozen]

    def _penalty(self, slots):
        alpha, beta = self.reg
        total = None
        for s in slots:
            v = s.variable.value
            if s.name.startswith("backbone."):
                term = (alpha / 2) * tf.reduce_sum(tf.square(v - self.anchors[s.name]))
            else:
                term = (beta / 2) * tf.reduce_sum(tf.square(v))
            total = term if total is None else total + term
        return total

    def _step(self, forward, y, lrs):
        slots = self._trainable()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for s in slots:
                tape.watch(s.variable.value)
            z = forward()
            loss = ops.mean(ops.binary_crossentropy(tf.constant(y), z, from_logits=True))
            total, reg = loss, 0.0
            if self.reg is not None and slots:
                penalty = self._penalty(slots)
                total = loss + penalty
        grads = tape.gradient(total, [s.variable.value for s in slots])
        if self.reg is not None and slots:
            reg = float(penalty)
        for s, g in zip(slots, grads):
            if g is not None:
                self._update(s, g, lrs[self.group_of[s.name]])
        return float(loss), reg

    def step(self, x, y, lrs):
        xt = tf.constant(x)
        return self._step(lambda: self.m.native(xt, training=True), y, lrs)

    def head_step(self, f, y, lrs):
        ft = tf.constant(f)
        return self._step(lambda: self.m.state["head_model"](ft, training=True), y, lrs)

    def _buf(self, slot, s, init):
        table = self.state.setdefault(slot, {})
        if s.name not in table:
            table[s.name] = tf.Variable(init, trainable=False)
            return table[s.name], True
        return table[s.name], False

    def _update(self, s, g, lr):
        cfg, var = self.cfg, s.variable
        p = var.value
        if cfg.name == "sgd":
            if cfg.weight_decay:
                g = g + cfg.weight_decay * p
            if cfg.momentum:
                buf, fresh = self._buf("momentum_buffer", s, g)
                if not fresh:
                    buf.assign(buf * cfg.momentum + g)
                g = g + cfg.momentum * buf if cfg.nesterov else tf.identity(buf)
            var.assign(p + (-lr) * g)
            return
        b1, b2 = cfg.betas
        if cfg.name == "adamw" and cfg.weight_decay:
            p = p * (1 - lr * cfg.weight_decay)
        elif cfg.weight_decay:
            g = g + cfg.weight_decay * p
        m, _ = self._buf("exp_avg", s, tf.zeros_like(p))
        v, _ = self._buf("exp_avg_sq", s, tf.zeros_like(p))
        t = self.steps[s.name] = self.steps.get(s.name, 0) + 1
        m.assign(m + (1 - b1) * (g - m))
        v.assign(v * b2 + (1 - b2) * g * g)
        step_size = lr / (1 - b1 ** t)
        denom = tf.sqrt(v) / (1 - b2 ** t) ** 0.5 + cfg.eps
        var.assign(p + (-step_size) * (m / denom))

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for slot, table in self.state.items():
            for name, var in table.items():
                out[f"{slot}/{name}"] = np.asarray(self.slots[name].to_canonical(var.numpy()))
        for name, t in self.steps.items():
            out[f"step/{name}"] = np.asarray(float(t), dtype=np.float32)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.state, self.steps = {}, {}
        for key, value in state.items():
            slot, name = key.split("/", 1)
            if slot == "step":
                self.steps[name] = int(round(float(value)))
            else:
                s = self.slots[name]
                self.state.setdefault(slot, {})[name] = tf.Variable(
                    np.ascontiguousarray(s.from_canonical(np.asarray(value)), dtype=self.m.dtype),
                    trainable=False)


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)

"""Keras on TensorFlow: what the Keras backend needs from its engine (the twin of
engine_jax.py, same names): forward passes and gradients (compute.py), the compiled steps
(training.py), devices (devices.py), exports (export.py), tf.distribute replicas (parallel.py), the float32 judge's
probe (probe.py)."""
from __future__ import annotations

from . import compute, devices, export, parallel, probe, training

features = compute.features
logits = compute.logits
loss_and_grads = compute.loss_and_grads
activations = probe.activations
Trainer = training.Trainer
traced_steps = training.traced_steps
seed_epoch = training.seed_epoch
resolve_device = devices.resolve
device_scope = devices.scope
to_device = devices.to_device
set_tf32 = devices.set_tf32
grow_gpu_memory = devices.grow_gpu_memory
export_model = export.export_model
saved_model_runner = export.saved_model_runner
cpu_replicas = parallel.cpu_replicas
from_env = parallel.from_env
replica_plan = parallel.plan

__all__ = ["features", "logits", "loss_and_grads", "activations", "Trainer", "traced_steps",
           "seed_epoch", "resolve_device", "device_scope", "to_device", "set_tf32", "cpu_replicas",
           "from_env", "replica_plan", "grow_gpu_memory", "export_model", "saved_model_runner"]

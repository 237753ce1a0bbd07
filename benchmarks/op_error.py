"""Where Keras' extra float32 error comes from: one operation at a time, each framework's float32
result against float64, median over 6 seeded draws (docs/parity.md, "Where Keras' float32
error comes from").

    .venv/bin/python benchmarks/op_error.py

Convolutions: torch in its default NCHW layout, torch in channels_last, and TensorFlow (NHWC,
the only layout its CPU kernels take) with oneDNN on (TF_ENABLE_ONEDNN_OPTS=1, the default) and
off; y is the output, dx and dw the gradients for a random output gradient. Then tlbridge's
Keras BatchNorm (eval and train mode), global average pooling and the dense head against
torch's. Each TensorFlow setting runs in its own process (the variable is read at import).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

CONVS = [(3, 64, 7, 2, 32), (64, 64, 3, 1, 8), (128, 128, 3, 1, 4), (256, 256, 3, 1, 2),
         (512, 512, 3, 1, 2), (64, 128, 1, 2, 8), (1152, 192, 1, 1, 1)]
DRAWS = 6


def err(a, t) -> float:
    return float(np.abs(a - t).max() / np.abs(t).max())


def _torch_conv(torch, x, w, dy, stride, fmt):
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt).requires_grad_()
    w = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=fmt).requires_grad_()
    y = torch.nn.functional.conv2d(x, w, stride=stride)
    y.backward(torch.from_numpy(dy).permute(0, 3, 1, 2))
    return (y.detach().permute(0, 2, 3, 1).numpy(), x.grad.permute(0, 2, 3, 1).numpy(),
            w.grad.permute(2, 3, 1, 0).numpy())


def _tf_conv(tf, x, w, dy, stride):
    x, w = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = tf.nn.conv2d(x, w, stride, "VALID")
    dx, dw = tape.gradient(y, [x, w], output_gradients=tf.constant(dy))
    return y.numpy(), dx.numpy(), dw.numpy()


def _conv_draw(rng, cin, cout, k, stride, hw):
    """Post-ReLU input (zero-padded as tlbridge pads), He-scaled weights, a random dy."""
    p = k // 2
    x = np.maximum(rng.normal(size=(4, hw, hw, cin)), 0)
    x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0))).astype(np.float32)
    w = (rng.normal(size=(k, k, cin, cout)) * np.sqrt(2 / (k * k * cin))).astype(np.float32)
    out = (hw + 2 * p - k) // stride + 1
    return x, w, rng.normal(size=(4, out, out, cout)).astype(np.float32)


def convs(who: str) -> dict:
    """{shape: {"y"/"dx"/"dw": median error}} for who in torch, torch_cl, tf."""
    from tlbridge import registry
    registry.load("torch"), registry.load("keras")
    import tensorflow as tf
    import torch
    rng = np.random.default_rng(0)
    out = {}
    for cin, cout, k, stride, hw in CONVS:
        errs = []
        for _ in range(DRAWS):
            x, w, dy = _conv_draw(rng, cin, cout, k, stride, hw)
            truth = _torch_conv(torch, x.astype(np.float64), w.astype(np.float64),
                                dy.astype(np.float64), stride, torch.contiguous_format)
            got = (_tf_conv(tf, x, w, dy, stride) if who == "tf" else
                   _torch_conv(torch, x, w, dy, stride,
                               torch.channels_last if who == "torch_cl" else torch.contiguous_format))
            errs.append([err(a, t) for a, t in zip(got, truth)])
        med = np.median(errs, axis=0)
        out[f"{cin}→{cout} {k}×{k}/{stride}"] = dict(zip(("y", "dx", "dw"), map(float, med)))
    return out


def _keras_bn(x, gamma, beta, mean, var, training):
    from tlbridge.backends.keras import network
    layer = network.TorchBatchNorm(dtype=str(x.dtype))
    layer.build(x.shape)
    for v, value in zip((layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                        (gamma, beta, mean, var)):
        v.assign(value.astype(x.dtype))
    return np.asarray(layer(x, training=training))


def _torch_bn(torch, x, gamma, beta, mean, var, training):
    t = [torch.from_numpy(a) for a in (x.transpose(0, 3, 1, 2).copy(), mean, var, gamma, beta)]
    y = torch.nn.functional.batch_norm(t[0], t[1].clone(), t[2].clone(), t[3], t[4], training)
    return y.numpy().transpose(0, 2, 3, 1)


def others() -> dict:
    """tlbridge's Keras BatchNorm, global average pooling and dense head against torch's."""
    from tlbridge import registry
    registry.load("torch"), registry.load("keras")
    import keras
    import torch
    rng = np.random.default_rng(1)
    rows = {}
    for name in ("BatchNorm eval", "BatchNorm train", "global average pool", "dense head"):
        errs = []
        for _ in range(DRAWS):
            x = (rng.normal(size=(16, 4, 4, 256)) * 2 + 0.5)
            c = x.shape[-1]
            p = [rng.normal(size=c), rng.normal(size=c), rng.normal(size=c) * 0.3,
                 rng.random(c) * 3 + 0.5]
            w = rng.normal(size=(c, 3)) / np.sqrt(c)

            def run(xx, dt, fw):
                if name.startswith("BatchNorm"):
                    args = [a.astype(dt) for a in p]
                    fn = _torch_bn if fw == "torch" else (lambda _t, *a: _keras_bn(*a))
                    return fn(torch, xx, *args, name.endswith("train"))
                if name == "global average pool":
                    return (torch.from_numpy(xx.transpose(0, 3, 1, 2).copy()).mean((2, 3)).numpy()
                            if fw == "torch" else np.asarray(keras.layers.GlobalAveragePooling2D(dtype=dt)(xx)))
                f = xx.mean((1, 2))
                if fw == "torch":
                    lin = torch.nn.Linear(c, 3).to(getattr(torch, dt))
                    with torch.no_grad():
                        lin.weight.copy_(torch.from_numpy(w.T.astype(dt)))
                        lin.bias.zero_()
                        return lin(torch.from_numpy(f)).numpy()
                dense = keras.layers.Dense(3, dtype=dt)
                dense.build((None, c))
                dense.kernel.assign(w.astype(dt))
                return np.asarray(dense(f))
            x32 = x.astype(np.float32)
            truth = run(x32.astype(np.float64), "float64", "torch")
            errs.append([err(run(x32, "float32", fw), truth) for fw in ("torch", "keras")])
        rows[name] = dict(zip(("torch", "keras"), map(float, np.median(errs, axis=0))))
    return rows


def _child(setting: str) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting}
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(on: dict, off: dict) -> list[str]:
    lines = ["Float32 error against float64, median of 6 draws (batch 4, post-ReLU inputs).",
             "", "| convolution | | torch (NCHW) | torch (channels_last) | TF, oneDNN on | TF, oneDNN off |",
             "|---|---|---|---|---|---|"]
    for shape in on["torch"]:
        for q in ("y", "dx", "dw"):
            v = [on["torch"][shape][q], on["torch_cl"][shape][q], on["tf"][shape][q], off["tf"][shape][q]]
            lines.append(f"| {shape} | {q} | " + " | ".join(f"{a:.1e}" for a in v) + " |")
    lines += ["", "| operation (16×4×4×256) | torch | Keras (tlbridge), oneDNN on | oneDNN off |",
              "|---|---|---|---|"]
    for name, v in on["others"].items():
        lines.append(f"| {name} | {v['torch']:.1e} | {v['keras']:.1e} | {off['others'][name]['keras']:.1e} |")
    return lines


def main():
    if "--child" in sys.argv:
        print(json.dumps({"torch": convs("torch"), "torch_cl": convs("torch_cl"),
                          "tf": convs("tf"), "others": others()}))
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from _out import write_table
    write_table("op_error", table(_child("1"), _child("0")))


if __name__ == "__main__":
    main()

"""The device checks in one go, for a machine with a GPU (or any device tlbridge accepts).

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--quick]

For each backend, on `--device` against the same model on the CPU:
1. float64 parity (TF32 off): loss and every gradient of seed_vgg with BatchNorm in train
   mode, device vs CPU, and torch-on-device vs Keras-on-device (bar 1e-10);
2. float32 on the device: each gradient's relative error against the CPU float64 truth,
   per tensor (reported, with torch's figure beside Keras');
3. one fine_tune epoch (SGD, momentum 0.9) on the device against the CPU, float64 (bar 1e-9);
4. speed: fine_tune img/s on ResNet-50 (64x64, batch 32): float32 with TF32 off and on, and
   mixed precision bf16 (and fp16 on a GPU), with the epoch's mean loss beside each.
Prints a table; exits 1 if a bar is missed. --quick uses fewer images (a smoke run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = (32, 32, 3)


def _model(tl, backend, device, dtype, name="seed_vgg", shape=SHAPE, **options):
    if name == "seed_vgg":
        options = {"widths": (8, 16), "batch_norm": True, **options}
    m = tl.load_backbone(name, backend=backend, input_shape=shape, dtype=dtype, seed=0,
                         device=device, **options)
    return tl.replace_head(m, 2, hidden=(8,), seed=1)


def _data(n, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]
    return x, np.hstack([y, 1 - y])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import tlbridge as tl

    rows, ok = [], True
    x, y = _data(8 if args.quick else 16)
    grads = {}
    for be in tl.available_backends():
        good, grads[be] = _parity_checks(tl, be, args.device, x, y, rows)
        ok &= good
    if len(grads) == 2:
        ok &= _cross_backend_check(grads, rows)
    _speed_checks(tl, args.device, args.quick, rows)

    print("| backend | check | figure | verdict |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if ok else 1


def _parity_checks(tl, be, device, x, y, rows):
    """Checks 1-3 for one backend, appended to `rows`: float64 loss and gradients on the
    device against the CPU, float32 gradients against that truth, one fine_tune epoch.
    Returns (every bar held, (device loss, device gradients, the zero-gradient set))."""
    from tlbridge import devices, parity
    ok = True
    cpu = _model(tl, be, "cpu", "float64")
    dev = _model(tl, be, device, "float64")
    with devices.precision(tf32=False):
        lc, gc = tl.loss_and_grads(cpu, x, y, training=True)
        ld, gd = tl.loss_and_grads(dev, x, y, training=True)
    zeros = parity.zero_set(gc)
    g = max(parity.rel_errors(gd, gc, skip=zeros).values())
    good = abs(lc - ld) <= 1e-10 and g <= 1e-10
    ok &= good
    rows.append((be, f"fp64 {dev.device} vs cpu", f"loss {abs(lc - ld):.1e}, grads {g:.1e}",
                 "ok" if good else "FAIL (bar 1e-10)"))
    d32 = _model(tl, be, device, "float32")
    tl.set_weights(d32, tl.get_weights(cpu))
    with devices.precision(tf32=False):
        _, g32 = tl.loss_and_grads(d32, x.astype(np.float32), y.astype(np.float32),
                                   training=True)
    err = parity.rel_errors(g32, gc, skip=zeros)
    rows.append((be, f"fp32 {d32.device} vs fp64 truth", f"worst tensor {max(err.values()):.1e}",
                 "reported"))
    for m in (cpu, dev):
        tl.fine_tune(m, (x, y), epochs=1, batch_size=4, optimizer=tl.optim.SGD(0.01), progress=False)
    w = parity.worst(tl.get_weights(cpu), tl.get_weights(dev), floor_rel=1e-6)[0]
    ok &= w <= 1e-9
    rows.append((be, f"fine_tune epoch {dev.device} vs cpu", f"weights {w:.1e}",
                 "ok" if w <= 1e-9 else "FAIL (bar 1e-9)"))
    return ok, (ld, gd, zeros)


def _cross_backend_check(grads, rows) -> bool:
    """Check 1 across backends: torch and Keras on the device, float64 (bar 1e-10)."""
    from tlbridge import parity
    (lt, gt, zeros), (lk, gk, _) = grads["torch"], grads["keras"]
    g = max(parity.rel_errors(gk, gt, skip=zeros).values())
    good = abs(lt - lk) <= 1e-10 and g <= 1e-10
    rows.append(("both", "fp64 torch vs keras on the device", f"loss {abs(lt - lk):.1e}, "
                 f"grads {g:.1e}", "ok" if good else "FAIL (bar 1e-10)"))
    return good


def _speed_checks(tl, device, quick, rows):
    """Check 4, appended to `rows`: fine_tune img/s per backend and precision (after a
    warm-up call), with the epoch's mean loss."""
    from tlbridge import devices
    n = 64 if quick else 256
    name, shape = ("seed_vgg", SHAPE) if quick else ("resnet50", (64, 64, 3))
    xs, ys = _data(n, shape, seed=1)
    xs = xs.astype(np.float32)
    runs = [("fp32", False), ("fp32", True), ("bf16", False)]
    if device.startswith("cuda"):
        runs.append(("fp16", False))
    for be in tl.available_backends():
        for precision, tf32 in runs:
            m = _model(tl, be, device, "float32", name=name, shape=shape)
            previous = tl.set_precision(tf32=tf32)
            try:
                tl.fine_tune(m, (xs[:32], ys[:32]), epochs=1, batch_size=32, progress=False,
                             precision=precision)
                t0 = time.perf_counter()
                h = tl.fine_tune(m, (xs, ys), epochs=1, batch_size=32, progress=False,
                                 precision=precision)
                rate = n / (time.perf_counter() - t0)
            finally:
                devices.restore_precision(previous)
            rows.append((be, f"speed {name} {precision}, TF32 {'on' if tf32 else 'off'}, "
                         f"{m.device}", f"{rate:.1f} img/s (loss {h['loss'][-1]:.4f})",
                         "reported"))


if __name__ == "__main__":
    sys.exit(main())

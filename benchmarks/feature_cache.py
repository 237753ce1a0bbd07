"""Feature cache speed-up: seconds per epoch of head training on a frozen backbone, with the
cache (features computed once, in the first epoch) and without (full forward every step).

    .venv/bin/python benchmarks/feature_cache.py [backbone] [n_images] [epochs]

Default: resnet18 at 64x64, 512 images, batch 32, 3 epochs, both backends.
"""
from __future__ import annotations

import os
import sys

import numpy as np  # noqa: E402

import tlbridge as tl  # noqa: E402
from _out import write_table  # noqa: E402


def run(backend, name, n, epochs, cache):
    m = tl.load_backbone(name, backend=backend, input_shape=(64, 64, 3), seed=0)
    m = tl.freeze(tl.replace_head(m, 1, seed=1), "backbone")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64, 64, 3)).astype("float32")
    y = (rng.random((n, 1)) > 0.5).astype("float32")
    h = tl.fine_tune(m, (x, y), epochs=epochs, batch_size=32, optimizer=tl.optim.SGD(1e-3), progress=False, feature_cache=cache)
    return h["seconds"], tl.get_weights(m)


def main(argv):
    name = argv[0] if argv else "resnet18"
    n = int(argv[1]) if len(argv) > 1 else 512
    epochs = int(argv[2]) if len(argv) > 2 else 3
    lines = [f"{name} at 64x64, {n} images, batch 32, backbone frozen, {os.cpu_count()} CPUs", "",
             "| backend | epoch 1 without cache | later epochs without cache | epoch 1 with cache "
             "(computes features) | later epochs with cache | speed-up after epoch 1 | max weight diff |",
             "|---|---|---|---|---|---|---|"]
    for backend in tl.available_backends():
        plain, w_plain = run(backend, name, n, epochs, False)
        cached, w_cached = run(backend, name, n, epochs, True)
        later_plain, later_cached = np.mean(plain[1:]), np.mean(cached[1:])
        diff = max(float(np.abs(w_plain[k] - w_cached[k]).max()) for k in w_plain)
        lines.append(f"| {backend} | {plain[0]:.2f}s | {later_plain:.2f}s | {cached[0]:.2f}s | "
                     f"{later_cached:.3f}s | {later_plain / later_cached:.0f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    write_table("feature_cache", lines)


if __name__ == "__main__":
    main(sys.argv[1:])

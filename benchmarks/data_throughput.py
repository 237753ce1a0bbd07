"""Throughput of tl.data.image_folder: one augmented epoch with background prefetch on vs off.

Writes synthetic 64x64 PNGs (2 classes) to a temporary folder, then times whole epochs:
first the loader alone (the consumer does nothing), then with a simulated training step per
batch that leaves the CPU free (time.sleep, like a Python thread waiting on a GPU), where
prefetch overlaps loading with the step even on one core.
Run: .venv/bin/python benchmarks/data_throughput.py [--images 512] [--repeats 3]
Writes benchmarks/out/data_throughput.md; benchmarks/fill_readme.py copies it into the README.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _out import write_table  # noqa: E402
from tlbridge import data  # noqa: E402


def write_images(root: str, n: int, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        d = os.path.join(root, f"class{i % 2}")
        os.makedirs(d, exist_ok=True)
        # smooth gradients plus noise: compresses like a photo rather than like pure noise
        a, b, c = rng.random(3)
        base = np.stack([np.sin(6 * a * xx + 3 * b * yy), np.cos(5 * b * yy + 2 * c * xx),
                         np.sin(4 * c * (xx + yy))], -1)
        img = (127.5 * (base + 1) + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
        Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i:05d}.png"))


def time_epoch(root, prefetch, workers, augment, batch_size, repeats, step_ms=0.0):
    ds = data.image_folder(root, (64, 64), augment=augment, batch_size=batch_size, seed=0,
                           prefetch=prefetch, workers=workers)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for x, _ in ds.epoch(r):
            n += len(x)
            if step_ms:
                time.sleep(step_ms / 1000)
        best = min(best, time.perf_counter() - t0)
    return n / best


ROWS = [("`Augment()`", True), ("no augmentation", False)]
SETTINGS = [("prefetch=2, workers=2", 2, 2), ("prefetch off", 0, 0)]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="epochs per setting; best is shown")
    ap.add_argument("--step-ms", type=float, default=10.0,
                    help="simulated training step per batch for the last rows (0: skip them)")
    args = ap.parse_args()
    load = f" (load average {os.getloadavg()[0]:.1f} at the start)" if hasattr(os, "getloadavg") else ""
    lines = [f"{usable_cpus()} CPUs{load}, {args.images} PNGs 64×64, batch {args.batch_size}:", "",
             "| setting | " + " | ".join(name for name, _, _ in SETTINGS) + " |",
             "|---|" + "---|" * len(SETTINGS)]
    with tempfile.TemporaryDirectory() as root:
        write_images(root, args.images)
        for step in [0.0] + ([args.step_ms] if args.step_ms else []):
            for label, augment in ROWS:
                where = "loader alone" if not step else f"with a {step:g} ms training step per batch"
                rates = [time_epoch(root, prefetch, workers, data.Augment() if augment else None,
                                    args.batch_size, args.repeats, step)
                         for _, prefetch, workers in SETTINGS]
                lines.append(f"| {label}, {where} | "
                             + " | ".join(f"{r:,.0f} images/s" for r in rates) + " |")
                print(lines[-1], flush=True)
    if args.step_ms:
        ceiling = args.batch_size / (args.step_ms / 1000)
        lines += ["", f"({ceiling:,.0f} images/s is the ceiling with a {args.step_ms:g} ms step at "
                      f"batch {args.batch_size}: loading is hidden behind the step.)"]
    print(f"wrote {write_table('data_throughput', lines)}")


if __name__ == "__main__":
    main()

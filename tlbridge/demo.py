"""`make demo`: one recipe, two frameworks, the same numbers.

seed_vgg built on PyTorch and on Keras from the same seeded weights, a new head, the
backbone frozen, then a batch of real images (scikit-learn's bundled digits, upscaled
to 32x32 RGB; no download): loss, largest gradient difference, predict time, side by side.
"""
from __future__ import annotations

import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def digits_rgb(size: int = 32):
    """sklearn's 8x8 digits as uint8 RGB images of size x size, and the label 'digit >= 5'."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images / 16.0 * 255.0).round().astype(np.uint8)          # (N, 8, 8)
    scale = size // 8
    big = np.kron(grey, np.ones((scale, scale), np.uint8))                    # nearest upscale
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return rgb, (digits.target >= 5).astype(np.float32)


def _timed(fn, repeat=3):
    fn()  # warm-up (graph tracing, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> int:
    import tlbridge as tl

    images, labels = digits_rgb()
    x = tl.preprocess("seed_vgg", images[:256])
    y = labels[:256]
    rows = {}
    for backend in ("torch", "keras"):
        m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(32, 32, 3), seed=0)
        m = tl.freeze(tl.replace_head(m, 1, seed=1), "backbone")
        loss, grads = tl.bce_loss_and_grads(m, x, y)
        probs, seconds = _timed(lambda: tl.predict(m, x))
        rows[backend] = (loss, grads, seconds, float(((probs[:, 0] > 0.5) == y).mean()))
    (lt, gt, st, at), (lk, gk, sk, ak) = rows["torch"], rows["keras"]
    gdiff = max(float(np.abs(gt[k] - gk[k]).max()) for k in gt)
    print(f"seed_vgg (widths 16-32-64), head 1 output, backbone frozen; {len(x)} digits images "
          f"(32x32 RGB), label = digit >= 5; gradients for {sorted(gt)}\n")
    print(f"{'':28}{'torch':>14}{'keras':>14}{'|diff|':>12}")
    print(f"{'BCE loss':28}{lt:>14.8f}{lk:>14.8f}{abs(lt - lk):>12.1e}")
    print(f"{'largest |gradient|':28}{max(np.abs(g).max() for g in gt.values()):>14.6f}"
          f"{max(np.abs(g).max() for g in gk.values()):>14.6f}{gdiff:>12.1e}")
    print(f"{'accuracy (untrained head)':28}{at:>14.3f}{ak:>14.3f}")
    print(f"{'predict time, 256 images':28}{st * 1e3:>12.1f}ms{sk * 1e3:>12.1f}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Print the cross-backend parity table: backbone x dtype x BatchNorm mode x frozen ->
worst relative difference of the loss, of every gradient, and of BN statistics.

    make parity            # or: .venv/bin/python benchmarks/parity_table.py [names...]

Same weights (tl.convert), same batch, both frameworks in one process. Relative means
max|torch - keras| / max|torch| per tensor, worst tensor shown.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tlbridge as tl  # noqa: E402
from tlbridge import parity, zoo  # noqa: E402

SHAPE = (32, 32, 3)
BATCH = {"float64": 4, "float32": 8}
K = 3


def rows(names):
    for name in names:
        for dtype in ("float64", "float32"):
            t0 = time.perf_counter()
            mt, mk = parity.pair(name, dtype=dtype, num_outputs=K, input_shape=SHAPE, seed=0)
            x, y = parity.batch(SHAPE, BATCH[dtype], K, seed=1, dtype=dtype)
            for frozen in (False, True):
                for m in (mt, mk):
                    tl.unfreeze(m, "all")
                    if frozen:
                        tl.freeze(m, "backbone")
                for training in (False, True):
                    r = parity.compare(mt, mk, x, y, training=training)
                    yield (name, dtype, "train" if training else "eval",
                           "frozen" if frozen else "trainable", r)
            print(f"  {name} {dtype}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def main(argv):
    names = argv or sorted(zoo.PORTABLE)
    lines = [f"Input {SHAPE[0]}x{SHAPE[1]}, batch 4 (fp64) / 8 (fp32), {K} outputs, seed 0.", "",
             "| backbone | dtype | BN mode | backbone | loss | worst gradient (tensor) | BN stats after pass | grads |",
             "|---|---|---|---|---|---|---|---|"]
    for name, dtype, mode, frozen, r in rows(names):
        lines.append(f"| {name} | {dtype} | {mode} | {frozen} | {r.loss:.1e} | {r.grads:.1e} "
                     f"(`{r.grads_at}`) | {r.stats:.1e} | {r.n_grads} |")
        print(lines[-1], flush=True)
    os.makedirs("benchmarks/out", exist_ok=True)
    with open("benchmarks/out/parity.md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

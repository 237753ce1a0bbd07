"""Print the cross-backend parity table: backbone x dtype x BatchNorm mode x frozen ->
worst relative difference of the loss, of every gradient, and of BN statistics.

    make parity            # or: .venv/bin/python benchmarks/parity_table.py [names...]

Same weights (tl.convert), same batch, both frameworks in one process, in the configuration
of tests/test_parity.py (tlbridge.parity.SHAPE/SHAPES/BATCH/CALIBRATE). Relative means
max|torch - keras| / max|torch| per tensor, worst tensor shown; "zero" counts BatchNorm tensors
that are zero to rounding on both backends (tlbridge.parity.split_zeros). For fp32 the last
column is torch's own fp32-vs-fp64 gradient error on the same weights: the scale fp32 allows.
"""
from __future__ import annotations

import os
import sys
import time


import tlbridge as tl  # noqa: E402
from _out import write_table  # noqa: E402
from tlbridge import parity, zoo  # noqa: E402

K = 3


def rows(names):
    for name in names:
        shape = parity.SHAPES.get(name, parity.SHAPE)
        for dtype in ("float64", "float32"):
            t0 = time.perf_counter()
            mt, mk = parity.pair(name, dtype=dtype, num_outputs=K, input_shape=shape, seed=0,
                                 calibrate=parity.CALIBRATE)
            x, y = parity.batch(shape, parity.BATCH[dtype], K, seed=1, dtype=dtype)
            for frozen in (False, True):
                for m in (mt, mk):
                    tl.unfreeze(m, "all")
                    if frozen:
                        tl.freeze(m, "backbone")
                for training in (False, True):
                    own = parity.fp32_error(mt, x, y, training=training) if dtype == "float32" else None
                    r = parity.compare(mt, mk, x, y, training=training)
                    yield (name, shape, dtype, "train" if training else "eval",
                           "frozen" if frozen else "trainable", r, own)
            print(f"  {name} {dtype}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def main(argv):
    names = argv or sorted(zoo.PORTABLE)
    lines = [f"Batch 4 (fp64) / 8 (fp32), {K} outputs, seed 0, BatchNorm calibrated "
             f"({parity.CALIBRATE} train-mode passes). Bars: fp64 ≤ 1e-10; fp32 ≤ 1e-4, or 2× "
             "torch's own fp32 error where that is larger.", "",
             "| backbone | input | dtype | BN | backbone | loss | worst gradient (tensor) | grads (zero) "
             "| BN stats after pass | torch fp32 own error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, shape, dtype, mode, frozen, r, own in rows(names):
        flag = " **>1e-4**" if own is not None and r.grads > 1e-4 else ""
        lines.append(f"| {name} | {shape[0]}×{shape[1]} | {dtype} | {mode} | {frozen} | {r.loss:.1e} | "
                     f"{r.grads:.1e}{flag} (`{r.grads_at}`) | {r.n_grads} ({r.zero_grads}) | "
                     f"{r.stats:.1e} | {'—' if own is None else f'{own:.1e}'} |")
        print(lines[-1], flush=True)
    write_table("parity", lines)


if __name__ == "__main__":
    main(sys.argv[1:])

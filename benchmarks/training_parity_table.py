"""Training parity: optimizer x frozen/unfrozen -> worst relative weight difference between
torch and keras after 2 epochs of tl.fine_tune from identical weights on identical data.

    .venv/bin/python benchmarks/training_parity_table.py
fp64, 24 images 32x32, batch 8 (3 steps/epoch, shuffled), 2 outputs. Cases as in
tests/test_training_parity.py. Relative to each tensor's max magnitude, floored at 1e-6 x the
largest weight (see tlbridge.parity.worst).
"""
from __future__ import annotations

import os
import sys

import numpy as np  # noqa: E402

import tlbridge as tl  # noqa: E402
from _out import write_table  # noqa: E402
from tlbridge import parity  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_training_parity import CASES, OPTIONS, RESNET, RESNET_CASES, SHAPE, _data  # noqa: E402


def train(name, case, frozen, cases=CASES, **options):
    mt, mk = parity.pair(name, dtype="float64", num_outputs=2, input_shape=SHAPE, seed=0, **options)
    x, y = _data()
    for m in (mt, mk):
        if frozen:
            tl.freeze(m, "backbone")
        tl.fine_tune(m, (x, y), epochs=2, batch_size=8, seed=5, progress=False, feature_cache=False,
                     **cases[case])
    return parity.worst(tl.get_weights(mt), tl.get_weights(mk), floor_rel=1e-6)


def main():
    lines = ["| backbone | case | backbone state | worst weight difference (tensor) |", "|---|---|---|---|"]
    jobs = [("seed_vgg", c, f, OPTIONS) for c in sorted(CASES) for f in (False, True)
            if not (c == "gradual-unfreeze" and f)]
    jobs += [("resnet18", c, f, {}) for c, f in RESNET]
    for name, case, frozen, options in jobs:
        diff, at = train(name, case, frozen, RESNET_CASES if name == "resnet18" else CASES, **options)
        state = "per plan" if case == "gradual-unfreeze" else ("frozen" if frozen else "trainable (train-mode BN)" if name == "resnet18" else "trainable")
        lines.append(f"| {name} | {case} | {state} | {diff:.1e} (`{at}`) |")
        print(lines[-1], flush=True)
    write_table("training_parity", lines)


if __name__ == "__main__":
    main()

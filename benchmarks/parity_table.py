"""Print the cross-backend parity tables, in the configuration of tests/test_parity.py
(tlbridge.parity.CONFIGS: input size and batch per backbone, BatchNorm calibrated).

    make parity            # or: .venv/bin/python benchmarks/parity_table.py [names...]

float64: torch vs Keras on the same weights and batch, per tensor (max|torch - keras| /
max|torch|), worst tensor shown, the bar is 1e-10. float32: each backend against the float64
truth on the same weights, per tensor; the worst tensor of each and the worst tensor relative to
its bar, keras <= max(1e-4, 4 x torch) and never above 1e-2. "sensitivity" is the conditioning
certificate: how far the float64 gradients move under probes of fp32-rounding size and 10x it
on every weight and input (tlbridge.parity.sensitivity).
"""
from __future__ import annotations

import sys
import time

import tlbridge as tl  # noqa: E402
from _out import write_table  # noqa: E402
from tlbridge import inputs, parity, zoo  # noqa: E402

K = 3


def rows(cases):
    for label, name, options in cases:
        t0 = time.perf_counter()
        cfg = parity.config(name, **options)
        s = parity.suite(name, K, **options)
        signature = s.models["torch", "float64"].inputs
        for mode in ("eval", "train"):
            training = mode == "train"
            s.reset(frozen=False)
            x, y = parity.batch(signature, cfg.batch64, K, seed=parity.SEED_BATCH)
            r64 = parity.compare(s.models["torch", "float64"], s.models["keras", "float64"], x, y,
                                 training=training)
            s.reset(frozen=False)
            x, y = parity.batch(signature, cfg.batch32, K, seed=cfg.seed32, dtype="float32")
            x = inputs.cast(x, "float64")
            sens = parity.sensitivity(s.models["torch", "float64"], x, y, training=training)
            r32 = parity.fp32_vs_fp64(s, x, y, training=training)
            s.reset(frozen=False)
            yield label, name, options, cfg, mode, r64, r32, sens
        print(f"  {label}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def _size(shape) -> str:
    """64×64 for images; "12 tokens" for a token model (parity.batch draws 12 positions)."""
    return f"{shape[0]}×{shape[1]}" if len(shape) == 3 else "12 tokens"


def main(argv):
    names = argv or sorted(zoo.PORTABLE)
    cases = [(n, n, {}) for n in names]
    if "seed_vgg" in names:
        cases.insert(names.index("seed_vgg") + 1, ("seed_vgg_bn", "seed_vgg", {"batch_norm": True}))
    f64 = ["| backbone | input | BN | loss | worst gradient (tensor) | gradients (zero: expected) | weights and BN stats after the pass |",
           "|---|---|---|---|---|---|---|"]
    f32 = ["| backbone | input, batch | BN | sensitivity | torch worst (tensor) | keras worst (tensor) | keras / bar, worst (tensor) | over bar | judged |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, backbone, options, cfg, mode, r64, r32, sens in rows(cases):
        m = tl.replace_head(tl.load_backbone(backbone, backend="torch", input_shape=cfg.shape, **options), K)
        expected = parity.expected_zero_grads(m, mode == "train")
        zero_note = f"{len(r64.zeros)}: {'yes' if r64.zeros == expected else f'NO ({len(expected)})'}"
        f64.append(f"| {name} | {_size(cfg.shape)} | {mode} | {r64.loss:.1e} | {r64.grads:.1e} "
                   f"(`{r64.grads_at}`) | {r64.n_grads} ({zero_note}) | {r64.stats:.1e} |")
        print(f64[-1], flush=True)
        t, tk = r32.worst("torch")
        k, kk = r32.worst("keras")
        ratio, rk = r32.worst_ratio()
        judged = "yes" if mode in cfg.fp32_modes else "no: ill-conditioned"
        f32.append(f"| {name} | {_size(cfg.shape)}, {cfg.batch32} | {mode} | {sens[0]:.1e} | "
                   f"{t:.1e} (`{tk}`) | {k:.1e} (`{kk}`) | {ratio:.2f} (`{rk}`) | {len(r32.failures())} | {judged} |")
        print(f32[-1], flush=True)
    lines = [f"float64, batch per backbone ({K} outputs, seed 0, BatchNorm calibrated by "
             f"{parity.CALIBRATE} cumulative passes). Bar: ≤ {parity.TOL['float64']:g} per tensor.", "", *f64, "",
             f"float32 against the float64 truth, per tensor. Bar: keras ≤ max({parity.FP32_FLOOR:g}, "
             f"{parity.FP32_C:g} × torch), both ≤ {parity.FP32_CEILING:g}; judged where the sensitivity "
             f"certificate is ≤ {parity.SENSITIVITY_MAX:g}; where no batch tried is, the row is "
             "shown but not judged (docs/parity.md).", "", *f32]
    write_table("parity", lines)


if __name__ == "__main__":
    main(sys.argv[1:])

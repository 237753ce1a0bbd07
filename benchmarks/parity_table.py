"""Print the cross-backend parity tables, in the configuration of tests/test_parity.py.

    make parity            # or: .venv/bin/python benchmarks/parity_table.py [names...]

float64: torch vs Keras on the same weights and batch, per tensor (max|torch - keras| /
max|torch|), worst tensor shown, the bar is 1e-10 (tlbridge.parity.CONFIGS: input size and batch
per backbone, BatchNorm calibrated). float32 (tlbridge/fp32.py): each backend against the float64
truth on the same float32-grid weights, over 12 seeded batches (32x32; eval batch 4, train 8):
forward quantities and per-tensor gradient medians (the figure: the median over tensors of
Keras' error / torch's), and the kink decisions float32 took differently from float64.
"""
from __future__ import annotations

import sys
import time

import tlbridge as tl  # noqa: E402
from _out import write_table  # noqa: E402
from tlbridge import fp32, parity, zoo  # noqa: E402

K = 3
RUNS = ("torch", "torch_cl", "keras")


def rows(cases):
    for label, name, options in cases:
        t0 = time.perf_counter()
        cfg = parity.config(name, **options)
        s = parity.suite(name, K, **options)
        setup = fp32.setup(name)
        s32 = s if tuple(cfg.shape) == setup.shape else parity.suite(name, K, input_shape=setup.shape, **options)
        for mode in ("eval", "train"):
            training = mode == "train"
            s.reset(frozen=False)
            x, y = parity.batch(s.models["torch", "float64"].inputs, cfg.batch64, K, seed=parity.SEED_BATCH)
            r64 = parity.compare(s.models["torch", "float64"], s.models["keras", "float64"], x, y,
                                 training=training)
            s.reset(frozen=False)
            yield label, name, options, cfg, setup, mode, r64, fp32.judge(s32, training, setup, runs=RUNS)
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
    f32 = ["| backbone | input, batch | BN | forward: keras ÷ torch (NCHW) | ÷ torch (channels_last) | gradients: keras ÷ torch (NCHW) | ÷ torch (channels_last) | worst gradient: torch | torch (channels_last) | keras (tensor) | kink flips: torch / channels_last / keras (of decisions) | most batches over the 4 × bar (tensor) | failures |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = ["| backbone | BN | fp32 forward: keras ÷ torch (NCHW / channels_last) | fp32 gradients: keras ÷ torch (NCHW / channels_last) | kink flips in 12 batches: torch / keras | judged |",
               "|---|---|---|---|---|---|"]
    for name, backbone, options, cfg, setup, mode, r64, j in rows(cases):
        m = tl.replace_head(tl.load_backbone(backbone, backend="torch", input_shape=cfg.shape, **options), K)
        expected = parity.expected_zero_grads(m, mode == "train")
        zero_note = f"{len(r64.zeros)}: {'yes' if r64.zeros == expected else f'NO ({len(expected)})'}"
        f64.append(f"| {name} | {_size(cfg.shape)} | {mode} | {r64.loss:.1e} | {r64.grads:.1e} "
                   f"(`{r64.grads_at}`) | {r64.n_grads} ({zero_note}) | {r64.stats:.1e} |")
        print(f64[-1], flush=True)
        t, _ = j.worst("grads", "torch")
        c, _ = j.worst("grads", "torch_cl")
        k, kk = j.worst("grads", "keras")
        near, near_at = j.most_excess()
        f32.append(f"| {name} | {_size(setup.shape)}, {setup.batch(mode == 'train')} | {mode} | "
                   f"{j.ratio('forward', 'torch'):.2f} | {j.ratio('forward'):.2f} | "
                   f"{j.ratio('grads', 'torch'):.2f} | {j.ratio('grads'):.2f} | {t:.1e} | {c:.1e} | "
                   f"{k:.1e} (`{kk}`) | {j.flips['torch']} / {j.flips['torch_cl']} / {j.flips['keras']} "
                   f"({j.decisions:,}) | {near} (`{near_at}`) | {len(j.failures())} |")
        print(f32[-1], flush=True)
        summary.append(f"| {name} | {mode} | {j.ratio('forward', 'torch'):.2f} / {j.ratio('forward'):.2f} | "
                       f"{j.ratio('grads', 'torch'):.2f} / {j.ratio('grads'):.2f} | "
                       f"{j.flips['torch']} / {j.flips['keras']} | {'pass' if not j.failures() else 'FAIL'} |")
    lines = [f"float64, batch per backbone ({K} outputs, seed 0, BatchNorm calibrated by "
             f"{parity.CALIBRATE} cumulative passes over batches of 16). Bar: ≤ {parity.TOL['float64']:g} per tensor.", "", *f64, "",
             f"float32 against the float64 truth over {fp32.BATCHES} seeded batches (gradients against "
             "float64 taken with each run's own kink decisions): medians per tensor, flips summed; "
             "ratios are the median over tensors. Bar, against torch with channels_last convolutions "
             f"(TensorFlow's kernels): a tensor fails where keras is above max(floor, {parity.FP32_C:g} × "
             f"torch) on the same batch in so many of the {fp32.BATCHES} batches that p < {fp32.ALPHA:g} "
             f"(a sign test: {fp32.batches_to_fail()} of them; floors {fp32.FLOOR['forward']:g} forward, "
             f"{fp32.FLOOR['grads']:g} gradients), or on a median above {parity.FP32_CEILING:g}; flips: keras not above {parity.FP32_C:g} × torch at p < "
             f"{fp32.ALPHA:g} (docs/parity.md).", "", *f32]
    write_table("parity", lines)
    write_table("parity_summary", [f"float32 against float64 over {fp32.BATCHES} batches, medians "
                                   "over tensors ([docs/parity.md](docs/parity.md#float32)).", "", *summary])


if __name__ == "__main__":
    main(sys.argv[1:])

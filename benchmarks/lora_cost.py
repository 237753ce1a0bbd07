"""What LoRA saves, measured: trainable parameters, optimizer state, peak memory growth and
step time for full fine-tuning vs LoRA (r = 8, every Linear / groups=1 Conv2d of the backbone)
vs head-only, on resnet50 and the packaged text encoder (minilm_l6), on both backends.

    .venv/bin/python benchmarks/lora_cost.py [n_samples] [batch]

Each configuration runs in its own process (peak RSS is per process): AdamW, float32, two
epochs; the step time is the median over the second epoch's steps, the feature cache off
(head-only would otherwise skip the backbone). Optimizer state is AdamW's two moments per
trainable parameter (float32). Peak memory: the growth of the process's peak RSS during
fine_tune (ru_maxrss), on the CPU. Writes benchmarks/out/lora_cost.md.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODELS = {"resnet50": "resnet50 64x64", "minilm_l6": "minilm_l6 (pretrained), 32 tokens"}
MODES = ("full", "lora r=8", "head only")


def _model(name: str, backend: str):
    import tlbridge as tl
    if name == "minilm_l6":
        m = tl.load_backbone(name, weights="pretrained", backend=backend)
    else:
        m = tl.load_backbone(name, backend=backend, input_shape=(64, 64, 3), seed=0)
    return tl.replace_head(m, 2, seed=1, loss="ce")


def _data(m, n: int):
    from tlbridge import parity
    x, _ = parity.batch(m.inputs, n, 1, seed=0, dtype="float32", length=32)
    return x, np.arange(n) % 2


def one(backend: str, name: str, mode: str, n: int, batch: int) -> dict:
    import tlbridge as tl
    m = _model(name, backend)
    if mode == "lora r=8":
        tl.add_lora(m, rank=8, alpha=16, seed=0)
    elif mode == "head only":
        tl.freeze(m, "backbone")
    x, y = _data(m, n)
    trainable = sum(int(np.prod(v.shape)) for k, v in tl.get_weights(m).items()
                    if k in set(tl.trainable_names(m)))
    steps: list[float] = []
    last = [time.perf_counter()]

    def tick(event, info):
        if event == "step":
            now = time.perf_counter()
            steps.append(now - last[0])
            last[0] = now
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    last[0] = time.perf_counter()
    tl.fine_tune(m, (x, y), epochs=2, batch_size=batch, optimizer=tl.optim.AdamW(lr=1e-4),
                 progress=False, callbacks=[tick], feature_cache=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_epoch = -(-n // batch)
    return {"trainable": trainable, "adam_bytes": 2 * 4 * trainable,
            "peak_mb": (peak - before) / 1024, "step_s": float(np.median(steps[per_epoch:]))}


def main(argv):
    if argv and argv[0] == "--one":
        print("RESULT " + json.dumps(one(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))))
        return
    n = int(argv[0]) if argv else 64
    batch = int(argv[1]) if len(argv) > 1 else 16
    import tlbridge as tl
    from _out import write_table
    lines = [f"AdamW, float32, batch {batch}, {n} samples x 2 epochs, {os.cpu_count()} CPUs; "
             f"step time: median of epoch 2; peak memory: growth of the process's peak RSS during "
             f"fine_tune", "",
             "| model | backend | mode | trainable parameters | AdamW state | peak memory growth | step time |",
             "|---|---|---|---|---|---|---|"]
    for name, label in MODELS.items():
        for backend in tl.available_backends():
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--one", backend, name, mode,
                                      str(n), str(batch)], capture_output=True, text=True)
                res = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if not res:
                    raise SystemExit(f"{name} {backend} {mode} failed:\n{out.stderr[-2000:]}")
                r = json.loads(res[-1][len("RESULT "):])
                lines.append(f"| {label} | {backend} | {mode} | {r['trainable']:,} | "
                             f"{r['adam_bytes'] / 2**20:.1f} MiB | {r['peak_mb']:.0f} MiB | "
                             f"{r['step_s'] * 1000:.0f} ms |")
                print(lines[-1], flush=True)
    print(write_table("lora_cost", lines))


if __name__ == "__main__":
    main(sys.argv[1:])

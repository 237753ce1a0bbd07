"""bf16 against fp32 training speed on each engine, and plain Keras beside it (issue 21 item 5).

    .venv/bin/python benchmarks/bf16_speed.py                       # resnet50 mobilenet_v2
    .venv/bin/python benchmarks/bf16_speed.py resnet50 --images 64 --repeats 3 --engines keras-tf

For each backbone (64x64 inputs, batch 32, random images, BCE, SGD) and each engine (torch,
Keras on TensorFlow, Keras on JAX; each in its own process), tlbridge's model trains one epoch
per call with `fine_tune(precision="fp32")` and, from the same weights, `precision="bf16"`;
on the Keras engines `keras.applications`' own model trains under `keras.fit` with the global
dtype policy "float32" and, a second model, "mixed_bfloat16" (Keras' own mixed precision:
what a Keras user would do instead). The runners take turns one epoch at a time after one
warm-up epoch each (so a slow minute of a shared machine hits all of them), and the median
epoch is reported. The figures to read are the bf16/fp32 ratios: absolute img/s on a shared
machine vary from run to run. Writes benchmarks/out/bf16_speed.md (the table of
docs/devices-and-data-parallel.md) and bf16_summary.md (the README's row per backbone); `make
speed` runs it after speed.py and `make readme` copies both in.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ENGINES = {"torch": ("torch", None), "keras-tf": ("keras", "tensorflow"),
           "keras-jax": ("keras", "jax")}
PLAIN = {"resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2"}
SIZE, BATCH, LR = 64, 32, 1e-3


def _data(n: int):
    rng = np.random.default_rng(0)
    x = rng.random((n, SIZE, SIZE, 3), dtype=np.float32)
    y = (rng.random((n, 1)) > 0.5).astype(np.float32)
    return x, y


def _tl_runners(tl, backend: str, name: str, x, y) -> dict:
    """fine_tune(epochs=1) in fp32 and in bf16, each on its own model from the same seed."""
    runners = {}
    for precision in ("fp32", "bf16"):
        m = tl.replace_head(tl.load_backbone(name, backend=backend, input_shape=(SIZE, SIZE, 3),
                                             seed=0), 1, seed=1)

        def epoch(m=m, precision=precision):
            tl.fine_tune(m, (x, y), epochs=1, batch_size=BATCH, optimizer=tl.optim.SGD(LR),
                         progress=False, precision=precision, feature_cache=False)
        runners[f"tlbridge {precision}"] = epoch
    return runners


def _plain_runners(name: str, x, y) -> dict:
    """keras.applications' model under keras.fit, built under the global dtype policy
    "float32" and "mixed_bfloat16" (the policy is put back afterwards)."""
    import keras
    runners = {}
    before = keras.config.dtype_policy()
    for precision, policy in (("fp32", "float32"), ("bf16", "mixed_bfloat16")):
        keras.config.set_dtype_policy(policy)
        try:
            km = getattr(keras.applications, PLAIN[name])(
                weights=None, input_shape=(SIZE, SIZE, 3), classes=1,
                classifier_activation=None)
            km.compile(optimizer=keras.optimizers.SGD(LR),
                       loss=keras.losses.BinaryCrossentropy(from_logits=True))
        finally:
            keras.config.set_dtype_policy(before)

        def epoch(km=km):
            km.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        runners[f"keras.applications + fit {precision}"] = epoch
    return runners


def run_engine(engine: str, name: str, images: int, repeats: int) -> dict:
    """In this process (its engine chosen by the caller's environment): every runner's epoch
    times, interleaved, after one warm-up epoch each."""
    import tlbridge as tl
    backend = ENGINES[engine][0]
    x, y = _data(images)
    runners = _tl_runners(tl, backend, name, x, y)
    if backend == "keras":
        runners.update(_plain_runners(name, x, y))
    first = {}
    for label, epoch in runners.items():
        t = time.perf_counter()
        epoch()
        first[label] = time.perf_counter() - t
    times = {label: [] for label in runners}
    for _ in range(repeats):
        for label, epoch in runners.items():
            t = time.perf_counter()
            epoch()
            times[label].append(time.perf_counter() - t)
    return {"engine": engine, "backbone": name, "images": images, "times": times,
            "first": first}


def _worker(engine: str, name: str, args) -> dict:
    env = dict(os.environ)
    if ENGINES[engine][1]:
        env["KERAS_BACKEND"] = ENGINES[engine][1]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, name,
           "--images", str(args.images), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _ratio_rows(rec: dict) -> list[str]:
    """One table row per runner pair (fp32, bf16): img/s each and bf16/fp32 speed."""
    rows = []
    med = {k: statistics.median(v) for k, v in rec["times"].items()}
    for label in [k[:-5] for k in med if k.endswith(" fp32")]:
        f32, b16 = med[f"{label} fp32"], med[f"{label} bf16"]
        pairs = [a / b for a, b in zip(rec["times"][f"{label} fp32"], rec["times"][f"{label} bf16"])]
        rows.append(f"| {rec['backbone']} | {rec['engine']} | {label} | "
                    f"{rec['images'] / f32:.1f} | {rec['images'] / b16:.1f} | **{f32 / b16:.2f}x** | "
                    f"{min(pairs):.2f}-{max(pairs):.2f} |")
    return rows


def table(results: list[dict], args) -> list[str]:
    cpu = platform.processor() or platform.machine()
    return [
        f"`benchmarks/bf16_speed.py`: {SIZE}x{SIZE} inputs, batch {BATCH}, {args.images} random "
        f"images an epoch, median of {args.repeats} interleaved epochs after a warm-up epoch; "
        f"{os.cpu_count()} CPU cores ({cpu}), shared with other work: read the ratios, not the "
        f"img/s. bf16/fp32 > 1 means bf16 is faster; the range is over the interleaved pairs.",
        "",
        "| backbone | engine | runner | fp32 img/s | bf16 img/s | bf16/fp32 | pairs |",
        "|---|---|---|---|---|---|---|",
        *[row for rec in results for row in _ratio_rows(rec)],
    ]


def _ratio(rec: dict, label: str) -> float | None:
    t = rec["times"]
    if f"{label} fp32" not in t:
        return None
    return statistics.median(t[f"{label} fp32"]) / statistics.median(t[f"{label} bf16"])


def summary(results: list[dict], args) -> list[str]:
    """The README's rows: tlbridge's bf16/fp32 speed per engine, plain Keras' beside it."""
    engines = list(dict.fromkeys(r["engine"] for r in results))
    lines = [f"bf16 ÷ fp32 training speed (`fine_tune(precision=...)`, median of {args.repeats} "
             f"interleaved epochs, {SIZE}×{SIZE}, batch {BATCH}); in brackets `keras.applications`' "
             f"model under keras.fit with Keras' `mixed_bfloat16` policy. Why and how: "
             f"[docs/devices-and-data-parallel.md](docs/devices-and-data-parallel.md#mixed-precision-on-the-cpu).",
             "", "| backbone | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for name in dict.fromkeys(r["backbone"] for r in results):
        cells = []
        for e in engines:
            rec = next((r for r in results if r["backbone"] == name and r["engine"] == e), None)
            tl_r = _ratio(rec, "tlbridge") if rec else None
            app = _ratio(rec, "keras.applications + fit") if rec else None
            cells.append("–" if tl_r is None else f"{tl_r:.2f}×" + (f" ({app:.2f}×)" if app else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbones", nargs="*", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--engines", default="torch,keras-tf,keras-jax")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "BACKBONE"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_engine(*args.worker, args.images, args.repeats)))
        return
    results = []
    for name in args.backbones:
        for engine in args.engines.split(","):
            results.append(_worker(engine, name, args))
            print("\n".join(_ratio_rows(results[-1])), flush=True)
    from _out import write_table
    print("wrote", write_table("bf16_speed", table(results, args)))
    print("wrote", write_table("bf16_summary", summary(results, args)))


if __name__ == "__main__":
    main()

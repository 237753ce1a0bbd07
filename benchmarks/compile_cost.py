"""What fine_tune(compile=True) costs and gains, measured: the first step (tracing and compiling
included) and the steady step time, compiled vs not, for a small model on each engine.

    .venv/bin/python benchmarks/compile_cost.py [backbone] [size] [batch] [steps] [rounds]

Defaults: resnet18 at 64x64, batch 16, 8 steps per epoch, 4 rounds, SGD with momentum, float32,
the feature cache off. One process per engine (Keras picks its engine once per process; every
compiler cache starts cold: torch.compile's inductor gets an empty cache directory). In it, an
eager and a compiled model of the same weights each train one epoch first ("first step": from
the fine_tune call to the end of its first step, trainer, tracing and compiling included), then
`rounds` more epochs each, interleaved eager / compiled so that a busy machine slows both alike;
"steady step" is the median over those rounds of each epoch's median step. Keras on JAX is
jitted either way (compile=True changes nothing there): one model. Writes
benchmarks/out/compile_cost.md and prints the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = (("torch", None), ("keras", "tensorflow"), ("keras", "jax"))
LABEL = {("torch", False): "torch eager", ("torch", True): "torch, torch.compile (inductor)",
         ("tensorflow", False): "Keras on TensorFlow, tf.function",
         ("tensorflow", True): "Keras on TensorFlow, XLA (jit_compile)",
         ("jax", True): "Keras on JAX, jax.jit (compile=True or not)"}


def _epoch(m, x, y, batch: int, compile: bool) -> tuple[list[float], float]:
    """One epoch's step times (the first from the call itself) and its mean loss."""
    import tlbridge as tl
    times, losses, last = [], [], [time.perf_counter()]

    def tick(event, info):
        if event == "step":
            now = time.perf_counter()
            times.append(now - last[0])
            losses.append(info["loss"])
            last[0] = now

    tl.fine_tune(m, (x, y), epochs=1, batch_size=batch, progress=False, feature_cache=False,
                 optimizer=tl.optim.SGD(0.01, momentum=0.9), compile=compile, callbacks=[tick])
    return times, float(np.mean(losses))


def one(backend: str, modes: tuple, name: str, size: int, batch: int, steps: int,
        rounds: int) -> dict:
    import tlbridge as tl
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, size, size, 3)).astype("float32")
    y = (rng.random((batch * steps, 1)) > 0.5).astype("float32")
    models = {c: tl.replace_head(tl.load_backbone(name, backend=backend, seed=0,
                                                  input_shape=(size, size, 3)), 1, seed=1)
              for c in modes}
    out = {}
    for c in modes:
        times, _ = _epoch(models[c], x, y, batch, c)
        out[c] = {"first": times[0], "epochs": [], "loss": None}
    for _ in range(rounds):
        for c in modes:
            times, loss = _epoch(models[c], x, y, batch, c)
            out[c]["epochs"].append(float(np.median(times[1:])))
            out[c]["loss"] = loss
    return {str(c): {"first": r["first"], "steady": float(np.median(r["epochs"])),
                     "loss": r["loss"]} for c, r in out.items()}


def _run(backend, engine, modes, args) -> dict:
    env = dict(os.environ, TLBRIDGE_BACKEND=backend)
    if engine:
        env["KERAS_BACKEND"] = engine
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache          # a cold inductor cache
        code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                f"import compile_cost as c; "
                f"print(json.dumps(c.one({backend!r}, {modes!r}, *{tuple(args)!r})))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(key: str, r: dict) -> list[str]:
    if "error" in r:
        return [f"| {key} | | failed: {r['error']} | | | |"]
    lines = []
    for c in (False, True):
        if str(c) not in r:
            continue
        v = r[str(c)]
        speed = ("1.00x" if not c else f"{r['False']['steady'] / v['steady']:.2f}x"
                 if "False" in r else "jitted either way")
        lines.append(f"| {LABEL[(key, c)]} | {c} | {v['first']:.1f} | {1000 * v['steady']:.1f} "
                     f"| {speed} | {v['loss']:.4f} |")
    return lines


def main() -> None:
    defaults = ["resnet18", "64", "16", "8", "4"]
    argv = sys.argv[1:6] + defaults[len(sys.argv[1:6]):]
    name, (size, batch, steps, rounds) = argv[0], (int(v) for v in argv[1:])
    lines = [f"{name} at {size}x{size}, batch {batch}, float32, SGD momentum, {os.cpu_count()} "
             f"CPU cores; first step: tracing and compiling included (cold caches); steady step: "
             f"median over {rounds} interleaved epochs of {steps} steps.", "",
             "| engine | compile | first step (s) | steady step (ms) | speed-up vs eager | "
             "last epoch's mean loss |", "|---|---|---|---|---|---|"]
    for backend, engine in ENGINES:
        modes = (True,) if engine == "jax" else (False, True)
        r = _run(backend, engine, modes, (name, size, batch, steps, rounds))
        lines += _rows(engine or backend, r)
        print("\n".join(lines[-len(modes):]), flush=True)
    from _out import write_table
    path = write_table("compile_cost", lines)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

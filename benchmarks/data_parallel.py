"""Data-parallel fine-tuning on this machine: parity with one process, and speed.

    .venv/bin/python benchmarks/data_parallel.py          # writes benchmarks/out/data_parallel.md

1. Parity (fp64, seed_vgg with BatchNorm, 37 images in batches of 10, 2 epochs: the runs of
   tests/workers/dp_train.py): torch on 2 ranks (torchrun, gloo) and Keras on 2 replicas
   (MirroredStrategy over 2 logical CPU devices) against one process, and against each other;
   the largest difference of any weight or BatchNorm statistic.
2. Speed (float32, resnet18 at 64x64, 512 images, global batch 64, one epoch after a warm-up
   epoch): one process with 2 threads against 2 ranks / replicas, img/s. On 2 CPU cores the
   ranks share the cores the single process already uses, so this shows the overhead of the
   collectives, not a speed-up; on N GPUs each rank has its own device.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORKER = os.path.join(ROOT, "tests", "workers", "dp_train.py")
RUNS = ["sgd:global:unfreeze", "adam:global:freeze_bn_biases", "sgd:local",
        "sgd:global:unfreeze:cache"]


def _env(threads="1", **extra):
    env = dict(os.environ, OMP_NUM_THREADS=threads, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.path.join(ROOT, "tests"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **extra}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, threads="1"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_port()}", *args]
    r = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout


def _python(*args, threads="2"):
    r = subprocess.run([sys.executable, *args], env=_env(threads), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout


def _diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def speed_worker(backend, replicas, bn_sync="global"):
    """One timed epoch (after a warm-up epoch); prints img/s as JSON on rank 0."""
    if replicas:
        from tlbridge.backends.keras import cpu_replicas
        cpu_replicas(replicas)
    import tlbridge as tl
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64, 64, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.float32)[:, None]
    m = tl.replace_head(tl.load_backbone("resnet18", backend=backend, input_shape=(64, 64, 3),
                                         seed=0), 1, seed=1)
    kw = dict(batch_size=64, progress=False, feature_cache=False, bn_sync=bn_sync)
    if replicas:
        kw["replicas"] = replicas
    tl.fine_tune(m, (x[:128], y[:128]), **kw)
    t0 = time.perf_counter()
    tl.fine_tune(m, (x, y), **kw)
    rate = len(x) / (time.perf_counter() - t0)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"rate": rate}))


def main() -> int:
    from tlbridge import weights as wio
    sys.path.insert(0, os.path.dirname(WORKER))
    import dp_train
    import tlbridge as tl
    from _out import write_table

    tmp = tempfile.mkdtemp()
    _torchrun(WORKER, "torch", f"{tmp}/t", *RUNS)
    _python(WORKER, "keras", f"{tmp}/k", *RUNS, "--replicas", "2")
    rows = ["| run (fp64, 2 epochs) | torch 2 ranks vs 1 process | Keras 2 replicas vs 1 "
            "process | torch 2 ranks vs Keras 2 replicas |", "|---|---|---|---|"]
    for i, run in enumerate(RUNS):
        t = wio.load_file(f"{tmp}/t.{i}.safetensors")[0]
        k = wio.load_file(f"{tmp}/k.{i}.safetensors")[0]
        one = {}
        for backend in ("torch", "keras"):
            m, _ = dp_train.train(backend, run)
            one[backend] = tl.get_weights(m)
        rows.append(f"| `{run}` | {_diff(t, one['torch']):.1e} | {_diff(k, one['keras']):.1e} | "
                    f"{_diff(t, k):.1e} |")
    rows += ["", "| resnet18 64x64 fp32, 512 images, batch 64 | 1 process (2 threads) | 2 ranks "
             "/ replicas (1 thread each), bn_sync global | same, bn_sync local |",
             "|---|---|---|---|"]
    me = os.path.abspath(__file__)
    for backend in ("torch", "keras"):
        one = json.loads(_python(me, "--speed", backend, "0").strip().splitlines()[-1])["rate"]
        two = []
        for bn_sync in ("global", "local"):
            if backend == "torch":
                out = _torchrun(me, "--speed", "torch", "0", bn_sync)
            else:
                out = _python(me, "--speed", "keras", "2", bn_sync, threads="1")
            two.append(json.loads(out.strip().splitlines()[-1])["rate"])
        rows.append(f"| {backend} img/s | {one:.1f} | {two[0]:.1f} | {two[1]:.1f} |")
    print("\n".join(rows))
    print("wrote", write_table("data_parallel", rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--speed":
        speed_worker(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        sys.exit(main())

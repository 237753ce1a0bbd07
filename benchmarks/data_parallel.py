"""Data-parallel fine-tuning on this machine: parity with one process, and speed.

    .venv/bin/python benchmarks/data_parallel.py          # writes benchmarks/out/data_parallel.md

1. Parity (fp64, seed_vgg with BatchNorm, 37 images in batches of 10, 2 epochs: the runs of
   tests/workers/dp_train.py): torch on 2 ranks (torchrun, gloo) and Keras on 2 replicas
   (MirroredStrategy over 2 logical CPU devices) against one process, and against each other;
   the largest difference of any weight or BatchNorm statistic.
2. Speed (float32, resnet18 at 64x64, 512 images, global batch 64, median of 5 epochs after
   a warm-up): one process with 2 threads against 2 ranks / replicas, img/s, beside the plain
   framework on the same 2 ranks / replicas (torch DistributedDataParallel, Keras model.fit
   under a MirroredStrategy; both with rank-local BatchNorm, as bn_sync="local"), the three
   run in turn, epoch by epoch, in one launch. On 2 CPU cores the
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
REPEATS = 5                     # timed epochs per runner; the median is reported
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


def _speed_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 64, 64, 3)).astype(np.float32)
    return x, (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.float32)[:, None]


def _resnet18(tl, backend):
    return tl.replace_head(tl.load_backbone("resnet18", backend=backend,
                                            input_shape=(64, 64, 3), seed=0), 1, seed=1)


def single_worker(backend):
    """One process: timed epochs after a warm-up; prints the median's img/s as JSON."""
    import tlbridge as tl
    x, y = _speed_data()
    m = _resnet18(tl, backend)
    kw = dict(batch_size=64, progress=False, feature_cache=False)
    tl.fine_tune(m, (x[:128], y[:128]), **kw)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        tl.fine_tune(m, (x, y), **kw)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rate": len(x) / float(np.median(times))}))


def parallel_worker(backend):
    """2 ranks (torchrun) or 2 replicas: tlbridge with bn_sync global, with local, and the plain
    framework (torch DistributedDataParallel with rank-local BatchNorm; Keras model.fit with
    the model built under a MirroredStrategy), one epoch each in turn, REPEATS rounds, so the
    machine's drift hits all three alike. Prints median img/s and the median per-round ratio
    tlbridge-local / framework time as JSON (rank 0)."""
    x, y = _speed_data()
    if backend == "keras":
        from tlbridge.backends.keras import cpu_replicas
        cpu_replicas(2)
    import tlbridge as tl
    runners = _tlbridge_runners(tl, backend, x, y)
    if backend == "torch":
        framework, rank = _torch_framework(tl, runners, x, y)
    else:
        framework, rank = _keras_framework(tl, x, y)
    runners["framework"] = framework
    times = _interleaved_times(runners, len(x))
    if rank == 0:
        out = {k: len(x) / float(np.median(v)) for k, v in times.items()}
        out["ratio"] = float(np.median(np.array(times["local"]) / np.array(times["framework"])))
        print(json.dumps(out))


def _tlbridge_runners(tl, backend, x, y):
    """bn_sync -> run(n): one tlbridge fine_tune epoch on the first n images, each on its own
    resnet18 (the same start), 2 ranks or 2 replicas."""
    kw = dict(batch_size=64, progress=False, feature_cache=False)
    runners = {}
    for bn_sync in ("global", "local"):
        m = _resnet18(tl, backend)
        replicas = 2 if backend == "keras" else None

        def run(n, m=m, bn_sync=bn_sync, replicas=replicas):
            tl.fine_tune(m, (x[:n], y[:n]), parallel=tl.Parallel(replicas, bn_sync), **kw)
        runners[bn_sync] = run
    return runners


def _torch_framework(tl, runners, x, y):
    """The plain-torch epoch: DistributedDataParallel and SGD on this rank's share of each
    batch of 64. The process group is tlbridge's (started by a first tlbridge run, so that
    run comes first). Returns (run(n), rank)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from tlbridge.parallel import shard_bounds
    runners["global"](64)               # initialises the process group (gloo)
    rank, world = dist.get_rank(), dist.get_world_size()
    net = DistributedDataParallel(_resnet18(tl, "torch").native)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, foreach=False)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y)
    rng = np.random.default_rng(0)

    def framework(n):
        net.train()
        order = torch.from_numpy(rng.permutation(n))
        for k in range(0, n, 64):
            idx = order[k:k + 64]
            a, b = shard_bounds(len(idx), world, rank)
            opt.zero_grad(set_to_none=True)
            loss_fn(net(xt[idx[a:b]]), yt[idx[a:b]]).backward()
            opt.step()
    return framework, rank


def _keras_framework(tl, x, y):
    """The plain-Keras epoch: model.fit with the model built under the MirroredStrategy that
    tlbridge's replicas=2 uses. Returns (run(n), rank 0)."""
    import keras
    from tlbridge.backends.keras import parallel as kp
    strategy = kp.strategy_for(kp.devices_for(2))   # the one tlbridge's replicas=2 uses
    with strategy.scope():
        model = _resnet18(tl, "keras").native
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))

    def framework(n):
        model.fit(x[:n], y[:n], batch_size=64, epochs=1, verbose=0)
    return framework, 0


def _interleaved_times(runners, n):
    """A warm-up epoch each (tracing, first allocations), then REPEATS rounds of one timed
    epoch per runner in turn, so drift hits all alike; runner -> seconds per round."""
    for run in runners.values():
        run(128)                            # warm-up: tracing, first allocations
    times = {k: [] for k in runners}
    for _ in range(REPEATS):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run(n)
            times[k].append(time.perf_counter() - t0)
    return times


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
    rows += ["", f"| resnet18 64x64 fp32, 512 images, batch 64, median of {REPEATS} epochs "
             f"| 1 process (2 threads) | 2 ranks / replicas (1 thread each), bn_sync global "
             f"| same, bn_sync local | the framework, 2 ranks / replicas (local BatchNorm) "
             f"| ratio: tlbridge local ÷ framework time |", "|---|---|---|---|---|---|"]
    me = os.path.abspath(__file__)
    for backend in ("torch", "keras"):
        one = json.loads(_python(me, "--single", backend).strip().splitlines()[-1])["rate"]
        if backend == "torch":
            out = _torchrun(me, "--parallel", "torch")
        else:
            out = _python(me, "--parallel", "keras", threads="1")
        r = json.loads(out.strip().splitlines()[-1])
        label = "DDP" if backend == "torch" else "keras.fit"
        rows.append(f"| {backend} img/s | {one:.1f} | {r['global']:.1f} | {r['local']:.1f} | "
                    f"{label} {r['framework']:.1f} | {r['ratio']:.2f} |")
    print("\n".join(rows))
    print("wrote", write_table("data_parallel", rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--single":
        single_worker(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--parallel":
        parallel_worker(sys.argv[2])
    else:
        sys.exit(main())

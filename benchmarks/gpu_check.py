"""The checks for the first GPU machine (issue 23), in one script that ends within 10 minutes.

    .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu_check [--parts a,b] [--budget 540]

Each part runs in a process of its own under its own timeout (a hang or a CUDA crash costs
that part only), torch first; TensorFlow may be absent (its parts then say so). Results go to
--out (default: benchmarks/out/gpu_check/results.json and
benchmarks/out/gpu_check/results.md). Without CUDA every GPU part reports "skipped: no CUDA"
at once and the rest run on the CPU (tests/test_gpu_check.py). docs/gpu.md says what each
part shows and which issue-23 item it settles.

Parts: env (versions, devices, bf16 support, TF32 state); tf32_roundtrip (tl.set_precision
leaves torch's own precision API as it was); tf32_numerics (TF32 off: float32 within 1e-6
of float64; on: measurably not); placement_torch (every parameter, buffer, gradient,
optimizer state, L2-SP anchor and fp16 scaler state on the GPU after steps; where the EMA
lives); host_syncs (torch's sync debug mode counts device-to-host syncs per step);
digits_torch (fp32 / bf16 / fp16 on the demo task); nccl_one_rank (one-rank NCCL
data-parallel, DDP and GlobalBatchNorm, against one process, float64, bar 1e-10);
global_bn_fp16 (float16 GlobalBatchNorm at 64x64 against float64); parity_torch (float64 on
the GPU against the CPU); keras_env (TensorFlow's GPUs, memory growth, then torch allocating
beside it); placement_keras; digits_keras; parity_keras.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPE = (32, 32, 3)
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")     # "cpu": a dry run of the GPU parts' code
if DEVICE == "cpu":
    from tlbridge import devices as _devices
    _devices._ALLOW_CPU_FP16 = True         # the dry run takes the fp16 path on the CPU


# -- helpers shared by the parts -----------------------------------------------------------
def _model(tl, backend, device, dtype, shape=SHAPE, seed=0):
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=shape, dtype=dtype,
                         seed=seed, device=device, widths=(8, 16), batch_norm=True)
    return tl.replace_head(m, 2, hidden=(8,), seed=seed + 1)


def _data(n, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape))
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(float)[:, None]
    return x, np.hstack([y, 1 - y])


def _capture_trainer(tl, backend):
    """The Trainer of the next fine_tune (to look at its state afterwards)."""
    from tlbridge import registry
    be = registry.load(backend)
    made, original = [], be.make_trainer

    def make(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]
    be.make_trainer = make
    return made


def _verdict(ok: bool, bar: str) -> str:
    return "ok" if ok else f"FAIL ({bar})"


# -- parts that run anywhere -------------------------------------------------------------
def part_env():
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    for name in ("torchvision", "tensorflow", "keras"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:
            out[name] = None
    if torch.cuda.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpus"] = [{"name": torch.cuda.get_device_name(i),
                        "capability": list(torch.cuda.get_device_capability(i)),
                        "bf16": torch.cuda.get_device_capability(i)[0] >= 8,
                        "memory_gib": round(torch.cuda.get_device_properties(i).total_memory
                                            / 2 ** 30, 1)}
                       for i in range(torch.cuda.device_count())]
    from tlbridge import registry
    out["torch_tf32"] = list(registry.load("torch").devices.tf32_enabled())
    return {"status": "reported", "figures": out}


def part_tf32_roundtrip():
    """Item 4: a set/restore round trip after set_float32_matmul_precision('medium')."""
    import torch

    import tlbridge as tl
    from tlbridge import devices, registry
    tdev = registry.load("torch").devices
    start = tdev.set_tf32(False)
    tdev.set_tf32(start)
    try:
        torch.set_float32_matmul_precision("medium")
        previous = tl.set_precision(tf32=False)
        off = tdev.tf32_enabled()
        devices.restore_precision(previous)
        after = torch.get_float32_matmul_precision()        # raised on torch >= 2.9 before
        ok = off == (False, False) and after == "medium"
    finally:
        tdev.set_tf32(start)
    return {"status": _verdict(ok, "medium kept, TF32 off inside"),
            "figures": {"inside": list(off), "after": after}}


# -- torch on the GPU ---------------------------------------------------------------------
def part_tf32_numerics():
    """TF32 off: float32 matmul and convolution within 1e-6 (norm-wise) of float64; on: the
    error grows by 10x or more (TF32's 10-bit mantissa), so the switch really acts."""
    import torch

    import tlbridge as tl
    from tlbridge import devices
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a, b = (torch.randn(1024, 1024, device=DEVICE, generator=g) for _ in range(2))
    x = torch.randn(16, 64, 32, 32, device=DEVICE, generator=g)
    w = torch.randn(64, 64, 3, 3, device=DEVICE, generator=g)
    ref_mm = a.double() @ b.double()
    ref_cv = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    errs = {}
    for on in (False, True):
        previous = tl.set_precision(tf32=on)
        try:
            mm = a @ b
            cv = torch.nn.functional.conv2d(x, w, padding=1)
            float(mm[0, 0] + cv[0, 0, 0, 0])         # waits for both
        finally:
            devices.restore_precision(previous)
        errs[on] = [float((mm.double() - ref_mm).abs().max() / ref_mm.abs().max()),
                    float((cv.double() - ref_cv).abs().max() / ref_cv.abs().max())]
    ok = max(errs[False]) <= 1e-6 and min(on / max(off, 1e-30) for on, off in
                                          zip(errs[True], errs[False])) >= 10
    return {"status": _verdict(ok, "off <= 1e-6, on >= 10x off"),
            "figures": {"off [matmul, conv]": errs[False], "on [matmul, conv]": errs[True]}}


def _tensor_places(trainer, net) -> dict:
    import torch
    places = {}
    for name, p in net.named_parameters():
        places[f"param {name}"] = p.device
        if p.grad is not None:
            places[f"grad {name}"] = p.grad.device
    for name, b in net.named_buffers():
        places[f"buffer {name}"] = b.device
    for p, state in trainer.opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:      # Adam's `step` is a CPU scalar
                places[f"opt {trainer.names[id(p)]}/{k}"] = v.device
    for name, a in trainer.anchors.items():
        places[f"anchor {name}"] = a.device
    if trainer.scaler is not None and getattr(trainer.scaler, "_scale", None) is not None:
        places["scaler scale"] = trainer.scaler._scale.device
    return {k: str(v) for k, v in places.items()}


def part_placement_torch():
    """Item 7's claim on torch: after steps with Adam + L2-SP + EMA, in fp32 and fp16."""
    import tlbridge as tl
    x, y = _data(16)
    report = {}
    for precision in ("fp32", "fp16"):
        made = _capture_trainer(tl, "torch")
        m = _model(tl, "torch", DEVICE, "float32")
        tl.fine_tune(m, (x.astype(np.float32), y), epochs=1, batch_size=8, progress=False,
                     precision=precision,
                     optimizer=tl.optim.Adam(1e-3, regularizer="l2sp", ema=0.9))
        places = _tensor_places(made[-1], m.native)
        report[precision] = {"tensors": len(places),
                             "off the GPU": sorted(k for k, v in places.items()
                                                   if not v.startswith("cuda"))}
    ok = all(not r["off the GPU"] for r in report.values())
    report["ema"] = "host numpy (tlbridge/training/loop.py: get_weights after every step)"
    return {"status": _verdict(ok, "every tensor on the GPU"), "figures": report}


def part_host_syncs():
    """Device-to-host syncs per step (torch.cuda.set_sync_debug_mode('warn'))."""
    import warnings

    import torch

    import tlbridge as tl
    x, y = _data(32)
    runs = {"adam fp32": ({}, "fp32"), "adam fp16": ({}, "fp16"),
            "adam l2sp+ema fp32": ({"regularizer": "l2sp", "ema": 0.9}, "fp32")}
    figures = {}
    for label, (extra, precision) in runs.items():
        m = _model(tl, "torch", DEVICE, "float32")
        kw = dict(epochs=1, batch_size=8, progress=False, precision=precision,
                  optimizer=tl.optim.Adam(1e-3, **extra))
        tl.fine_tune(m, (x[:8].astype(np.float32), y[:8]), **kw)       # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tl.fine_tune(m, (x.astype(np.float32), y), **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        figures[label] = round(len(syncs) / 4, 2)         # 32 rows / batch 8 = 4 steps
    return {"status": "reported", "figures": {"syncs per step": figures}}


def _digits_run(tl, backend, device):
    from tlbridge import demo
    images, labels = demo.digits_rgb(16)
    keep = labels >= 5
    x = images[keep].astype(np.float32) / 255.0
    y = (labels[keep] >= 7).astype(np.float32)[:, None]
    (xt, yt), (xv, yv) = demo.split(x, y)
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        m = tl.replace_head(tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3),
                                             seed=3, batch_norm=True, device=device), 1, seed=4)
        t0 = time.perf_counter()
        h = tl.fine_tune(m, (xt, yt), val=(xv, yv), epochs=4, batch_size=32, progress=False,
                         optimizer=tl.optim.Adam(0.003), precision=precision)
        out[precision] = {"val_accuracy": round(h["val_accuracy"][-1], 4),
                          "loss": [round(v, 4) for v in h["loss"]],
                          "seconds": round(time.perf_counter() - t0, 1)}
    fp32 = out["fp32"]["val_accuracy"]
    ok = all(out[p]["val_accuracy"] >= 0.85 and abs(out[p]["val_accuracy"] - fp32) <= 0.05
             for p in ("bf16", "fp16"))
    return {"status": _verdict(ok, "val acc >= 0.85, within 0.05 of fp32"), "figures": out}


def part_digits_torch():
    import tlbridge as tl
    return _digits_run(tl, "torch", DEVICE)


def _one_rank_env():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")


def part_nccl_one_rank():
    """The data-parallel path (NCCL process group bound to the GPU, DDP with the summing hook,
    GlobalBatchNorm) with one rank, against one process on the same GPU: float64, 1e-10."""
    import tlbridge as tl
    from tlbridge import parallel, parity
    x, y = _data(32)
    plain = _model(tl, "torch", DEVICE, "float64")
    ranked = _model(tl, "torch", DEVICE, "float64")
    kw = dict(epochs=2, batch_size=8, progress=False, optimizer=tl.optim.SGD(0.01, momentum=0.9))
    tl.fine_tune(plain, (x, y), **kw)
    _one_rank_env()
    parallel.torch_env = lambda: (1, 0)         # WORLD_SIZE=1 would mean "not distributed"
    h = tl.fine_tune(ranked, (x, y), parallel=tl.Parallel(bn_sync="global"), **kw)
    import torch.distributed as dist
    backend = dist.get_backend()
    worst = parity.worst(tl.get_weights(plain), tl.get_weights(ranked), floor_rel=1e-6)[0]
    dist.destroy_process_group()
    ok = worst <= 1e-10 and backend == "nccl"
    return {"status": _verdict(ok, "nccl, weights <= 1e-10"),
            "figures": {"backend": backend, "weights worst": worst, "loss": h["loss"]}}


def part_global_bn_fp16():
    """Item 6 on the GPU: float16 GlobalBatchNorm, batch 20 at 64x64 (count 81,920 > 65504),
    |x - mean| > 256, against float64 BatchNorm."""
    import torch
    import torch.distributed as dist

    from tlbridge import registry
    par = registry.load("torch").parallel
    _one_rank_env()
    par.init(1, 0, "cuda:0" if DEVICE == "cuda" else DEVICE)
    torch.manual_seed(0)
    x64 = torch.randn(20, 8, 64, 64, dtype=torch.float64, device=DEVICE) * 300 + 50
    dy = torch.randn_like(x64).half()
    bn = torch.nn.BatchNorm2d(8).to(DEVICE).train()
    par.sync_batchnorm(bn, True)
    x = x64.half().requires_grad_(True)
    out = bn(x)
    out.backward(dy)
    ref = torch.nn.BatchNorm2d(8).double().to(DEVICE).train()
    xr = x.detach().double().requires_grad_(True)
    yr = ref(xr)
    yr.backward(dy.double())
    figures = {"output max abs err": float((out.double() - yr).detach().abs().max()),
               "input grad rel err": float((x.grad.double() - xr.grad).norm() / xr.grad.norm()),
               "running_var finite": bool(torch.isfinite(bn.running_var).all())}
    dist.destroy_process_group()
    ok = figures["running_var finite"] and figures["output max abs err"] <= 1e-2 and \
        figures["input grad rel err"] <= 1e-2
    return {"status": _verdict(ok, "finite; output 1e-2; grad 1e-2"), "figures": figures}


def _parity(backend):
    """float64 loss and gradients (BatchNorm in train mode) on the GPU against the CPU (bar
    1e-10), and one fine_tune epoch (bar 1e-9)."""
    import tlbridge as tl
    from tlbridge import devices, parity
    x, y = _data(16)
    cpu, dev = (_model(tl, backend, d, "float64") for d in ("cpu", DEVICE))
    with devices.precision(tf32=False):
        lc, gc = tl.loss_and_grads(cpu, x, y, training=True)
        ld, gd = tl.loss_and_grads(dev, x, y, training=True)
    zeros = parity.zero_set(gc)
    g = max(parity.rel_errors(gd, gc, skip=zeros).values())
    for m in (cpu, dev):
        tl.fine_tune(m, (x, y), epochs=1, batch_size=4, optimizer=tl.optim.SGD(0.01),
                     progress=False)
    w = parity.worst(tl.get_weights(cpu), tl.get_weights(dev), floor_rel=1e-6)[0]
    ok = abs(lc - ld) <= 1e-10 and g <= 1e-10 and w <= 1e-9
    return {"status": _verdict(ok, "loss/grads 1e-10, epoch 1e-9"),
            "figures": {"device": dev.device, "loss": abs(lc - ld), "grads": g, "epoch": w}}


def part_parity_torch():
    return _parity("torch")


# -- Keras (TensorFlow) on the GPU -----------------------------------------------------------
def part_keras_env():
    """Items 2 and 3: TensorFlow sees the GPU (the tensorflow[and-cuda] build) with memory
    growth set; then torch allocates 4 GiB beside a Keras model on the same GPU."""
    import tlbridge as tl
    from tlbridge import registry
    registry.load("keras")
    import tensorflow as tf
    import torch
    gpus = tf.config.list_physical_devices("GPU")
    figures = {"tf_gpus": [g.name for g in gpus],
               "memory_growth": [tf.config.experimental.get_memory_growth(g) for g in gpus],
               "details": [tf.config.experimental.get_device_details(g) for g in gpus]}
    if gpus:
        m = _model(tl, "keras", DEVICE, "float32")
        tl.predict(m, _data(8)[0].astype(np.float32))
        figures["tf_bytes_in_use"] = tf.config.experimental.get_memory_info("GPU:0")["current"]
        big = torch.empty(4 * 2 ** 30, dtype=torch.uint8, device=DEVICE)
        figures["torch_4gib_after_keras"] = big.numel() == 4 * 2 ** 30
    ok = bool(gpus) and all(figures["memory_growth"]) and figures.get("torch_4gib_after_keras")
    return {"status": _verdict(ok, "TF sees the GPU, growth on, torch allocates"),
            "figures": figures}


def part_placement_keras():
    """Item 7 on the GPU: model variables, optimizer state, anchors, loss scale on GPU:0."""
    import tlbridge as tl
    x, y = _data(16)
    report = {}
    for precision in ("fp32", "fp16"):
        m = _model(tl, "keras", DEVICE, "float32")
        tl.fine_tune(m, (x.astype(np.float32), y), epochs=1, batch_size=8, progress=False,
                     precision=precision,
                     optimizer=tl.optim.Adam(1e-3, regularizer="l2sp", ema=0.9))
        c = m.state["_train"]
        state = [v.device for t in c.state.values() for v in t.values()]
        state += [v.device for v in c.anchors.values()] + [c.loss_scale.device,
                                                           c.good_steps.device]
        model = [v.value.device for v in m.native.variables]
        report[precision] = {"tensors": len(state) + len(model),
                             "off the GPU": sorted({d for d in state + model if "GPU:0" not in d})}
    ok = all(not r["off the GPU"] for r in report.values())
    return {"status": _verdict(ok, "every variable on GPU:0"), "figures": report}


def part_digits_keras():
    import tlbridge as tl
    return _digits_run(tl, "keras", DEVICE)


def part_parity_keras():
    return _parity("keras")


# name: (function, needs CUDA, needs TensorFlow, timeout in seconds)
PARTS = {
    "env": (part_env, False, False, 60),
    "tf32_roundtrip": (part_tf32_roundtrip, False, False, 60),
    "tf32_numerics": (part_tf32_numerics, True, False, 60),
    "placement_torch": (part_placement_torch, True, False, 90),
    "host_syncs": (part_host_syncs, True, False, 90),
    "digits_torch": (part_digits_torch, True, False, 120),
    "nccl_one_rank": (part_nccl_one_rank, True, False, 120),
    "global_bn_fp16": (part_global_bn_fp16, True, False, 60),
    "parity_torch": (part_parity_torch, True, False, 90),
    "keras_env": (part_keras_env, True, True, 120),
    "placement_keras": (part_placement_keras, True, True, 120),
    "digits_keras": (part_digits_keras, True, True, 150),
    "parity_keras": (part_parity_keras, True, True, 120),
}


def _skip_reason(name, cuda: bool, tensorflow: bool) -> str | None:
    _, needs_cuda, needs_tf, _ = PARTS[name]
    if needs_cuda and not cuda:
        return "skipped: no CUDA"
    if needs_tf and not tensorflow:
        return "skipped: no TensorFlow"
    return None


def _run_part(name, out_dir, timeout) -> dict:
    """One part in a process of its own; what it wrote, or why it wrote nothing."""
    result = os.path.join(out_dir, f"{name}.part.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"FAIL (timeout after {timeout:.0f} s)"}
    if proc.returncode != 0 or not os.path.exists(result):
        return {"status": f"FAIL (exit {proc.returncode})", "stderr": proc.stderr[-3000:]}
    with open(result) as f:
        out = json.load(f)
    os.remove(result)
    return out


def _markdown(results: dict) -> str:
    lines = ["| part | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in results.items():
        figures = json.dumps(r.get("figures", r.get("stderr", "")), default=str)
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | "
                     f"{figures.replace('|', '/')[:1500]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "gpu_check"))
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated part names")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all parts")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:                               # the child: one part, its result to a file
        out = PARTS[args.part][0]()
        with open(args.result, "w") as f:
            json.dump(out, f, default=str)
        return 0
    import torch
    cuda = torch.cuda.is_available()
    tensorflow = importlib.util.find_spec("tensorflow") is not None
    os.makedirs(args.out, exist_ok=True)
    results, start = {}, time.perf_counter()
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t0 = time.perf_counter()
        left = args.budget - (t0 - start)
        reason = _skip_reason(name, cuda, tensorflow) or \
            ("skipped: out of time (--budget)" if left < 20 else None)
        results[name] = {"status": reason} if reason else \
            _run_part(name, args.out, min(PARTS[name][3], left))
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']:.1f} s)", flush=True)
    base = os.path.join(args.out, "results")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(_markdown(results))
    return 1 if any(r["status"].startswith("FAIL") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

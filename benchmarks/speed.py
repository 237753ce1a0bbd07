"""Training and inference speed of tlbridge against the plain framework, on each backend.

    .venv/bin/python benchmarks/speed.py resnet50 mobilenet_v2 efficientnet_b0
    .venv/bin/python benchmarks/speed.py seed_vgg --image-size 32 --batch-size 16 --repeats 3

For each portable backbone and each installed backend, four runners train one model each,
all built from one seed (so the same weights) on the same random images and the same batch
order, SGD lr 1e-3 momentum 0.9 (a fresh optimizer state each epoch, as each
`fine_tune(epochs=1)` call starts one), BCE from logits:
  torch: a plain torch loop on the tlbridge-built nn.Module  vs  tl.fine_tune
  keras: keras.fit (Keras' own SGD) on the tlbridge-built keras.Model  vs  tl.fine_tune
The runners take turns one epoch at a time (so a slow minute of the machine hits all of
them), after one warm-up epoch each; an epoch is timed as the whole call a user makes
(`fine_tune(epochs=1)`, `fit(epochs=1)`, the loop). Inference compares tl.features and
tl.logits with the framework's own per-batch call (predict_on_batch, module under no_grad).

No speed is reported for a computation that differs: the mean loss of every epoch must agree
across all runners of both backends (relative 1e-4 in float32, 1e-9 in float64), else the
script stops with the figures. Each backend runs in its own process (clean peak memory, no
thread pools competing); the runners of one backend share that process.

Writes benchmarks/out/speed.md (filled into the README by benchmarks/fill_readme.py),
speed.json (every timing) and speed.png. On a machine with a GPU, Keras runs on it (TF places
the model there); tlbridge's torch backend trains on the CPU (no device support yet), and the
table states each backend's device and TF32 setting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LR, MOMENTUM, SEED = 1e-3, 0.9, 0
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}
BOUND = {"torch": 1.05, "keras": 1.10}          # issue 8: tl within this factor of the framework


# ------------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory during a block, above what the process held when it began
    (sampled every 2 ms from /proc; 0 where /proc is missing)."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def __enter__(self):
        self.start = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, self._rss() - self.start)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.start)


def _timed(fn):
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return seconds, mem.peak, out


def _summary(times: list[float], images: int) -> dict:
    rates = images / np.asarray(times)
    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"img_s": float(med), "iqr": [float(q1), float(q3)], "seconds": [float(t) for t in times]}


# ------------------------------------------------------------------------------- one backend
def _data(args):
    rng = np.random.default_rng(SEED)
    s = args.image_size
    x = rng.normal(size=(args.images, s, s, 3)).astype(args.dtype)
    y = (rng.random((args.images, 1)) > 0.5).astype(args.dtype)
    return x, y


def _model(tl, backend, name, args):
    m = tl.load_backbone(name, backend=backend, input_shape=(args.image_size, args.image_size, 3),
                         dtype=args.dtype, seed=SEED)
    return tl.replace_head(m, 1, seed=SEED + 1)


def _torch_runners(tl, name, args, x, y):
    import torch
    import torch.nn.functional as F

    base, ours = _model(tl, "torch", name, args), _model(tl, "torch", name, args)
    net = base.native
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y)

    def raw_epoch(order):
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        net.train()
        losses = []
        for i in range(0, len(order), args.batch_size):
            idx = torch.from_numpy(order[i:i + args.batch_size])
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        net.eval()
        return float(np.mean(losses))

    def raw_infer(which):
        net.eval()
        with torch.no_grad():
            for i in range(0, len(xt), args.batch_size):
                xb = xt[i:i + args.batch_size]
                (net.backbone(xb) if which == "features" else net(xb)).numpy()

    info = {"device": "cpu", "tf32": "n/a (cpu)",
            "threads": f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"}
    return base, ours, raw_epoch, raw_infer, info


def _keras_runners(tl, name, args, x, y):
    import keras
    import tensorflow as tf

    base, ours = _model(tl, "keras", name, args), _model(tl, "keras", name, args)
    km = base.native
    km.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
               loss=keras.losses.BinaryCrossentropy(from_logits=True))
    fm = base.state["feature_model"]

    def raw_epoch(order):
        for v in getattr(km.optimizer, "momentums", []):   # a fresh optimizer state, as each
            v.assign(np.zeros(v.shape, v.dtype))                # fine_tune call starts with
        h = km.fit(x[order], y[order], batch_size=args.batch_size, epochs=1, shuffle=False,
                   verbose=0)
        return float(h.history["loss"][0])

    def raw_infer(which):
        model = fm if which == "features" else km
        for i in range(0, len(x), args.batch_size):
            np.asarray(model.predict_on_batch(x[i:i + args.batch_size]))

    gpus = tf.config.list_physical_devices("GPU")
    info = {"device": (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                       if gpus else "cpu"),
            "tf32": (str(tf.config.experimental.tensor_float_32_execution_enabled()) if gpus
                     else "n/a (cpu)"),
            "threads": (f"TF intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}, "
                        f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'auto'}")}
    return base, ours, raw_epoch, raw_infer, info


def run_backend(backend: str, name: str, args) -> dict:
    import tlbridge as tl

    x, y = _data(args)
    make = _torch_runners if backend == "torch" else _keras_runners
    base, ours, raw_epoch, raw_infer, info = make(tl, name, args, x, y)

    def tl_epoch(repeat):
        ds = tl.data.arrays(x, y, batch_size=args.batch_size, seed=repeat, dtype=args.dtype)
        h = tl.fine_tune(ours, ds, epochs=1, lr=LR, momentum=MOMENTUM, progress=False,
                         feature_cache=False, seed=repeat)
        return float(h["loss"][-1])

    def order(repeat):
        return tl.data.arrays(x, y, batch_size=args.batch_size, seed=repeat).plan(0)[0]

    runs = {"raw": lambda r: raw_epoch(order(r)), "tl": tl_epoch}
    train = {k: {"times": [], "memory": 0, "losses": []} for k in runs}
    for repeat in range(args.repeats + 1):                 # repeat 0 is the warm-up epoch
        for key, fn in runs.items():
            seconds, mem, loss = _timed(lambda: fn(repeat))
            rec = train[key]
            rec["memory"] = max(rec["memory"], mem)
            rec["losses"].append(loss)
            if repeat == 0:
                rec["first"] = seconds
            else:
                rec["times"].append(seconds)

    infer_fns = {"raw features": lambda: raw_infer("features"),
                 "tl features": lambda: tl.features(ours, x, batch_size=args.batch_size),
                 "raw logits": lambda: raw_infer("logits"),
                 "tl logits": lambda: tl.logits(ours, x, batch_size=args.batch_size)}
    infer = {k: {"times": [], "memory": 0} for k in infer_fns}
    for repeat in range(args.repeats + 1):
        for key, fn in infer_fns.items():
            seconds, mem, _ = _timed(fn)
            infer[key]["memory"] = max(infer[key]["memory"], mem)
            if repeat == 0:
                infer[key]["first"] = seconds
            else:
                infer[key]["times"].append(seconds)

    for table in (train, infer):
        for rec in table.values():
            rec.update(_summary(rec.pop("times"), args.images))
    return {"backend": backend, "backbone": name, "train": train, "infer": infer, **info,
            "versions": _versions(backend)}


def _versions(backend: str) -> dict:
    import tlbridge
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "tlbridge": getattr(tlbridge, "__version__", "?")}
    if backend == "torch":
        import torch
        out["torch"] = torch.__version__
    else:
        import keras
        import tensorflow as tf
        out.update(tensorflow=tf.__version__, keras=keras.__version__)
    return out


# ------------------------------------------------------------------------------- orchestration
def _worker(backend, name, args) -> dict:
    """Run one backend in a fresh process and read its JSON back."""
    cmd = [sys.executable, os.path.abspath(__file__), name, "--worker", backend,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--images", str(args.images), "--repeats", str(args.repeats), "--dtype", args.dtype]
    env = dict(os.environ, TLBRIDGE_BACKEND=backend)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"The {backend} run of {name} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def check_losses(results: list[dict], dtype: str) -> float:
    """The largest relative difference of any runner's epoch loss from torch's tl.fine_tune;
    stops the benchmark when it is above the tolerance."""
    ref = next(r for r in results if r["backend"] == "torch")["train"]["tl"]["losses"] \
        if any(r["backend"] == "torch" for r in results) else results[0]["train"]["tl"]["losses"]
    worst, where = 0.0, ""
    for r in results:
        for runner, rec in r["train"].items():
            diff = float(np.max(np.abs(np.subtract(rec["losses"], ref)) / np.maximum(np.abs(ref), 1e-12)))
            if diff > worst:
                worst, where = diff, f"{r['backend']} {runner}"
    if worst > TOLERANCE[dtype]:
        lines = [f"  {r['backend']} {k}: {v['losses']}" for r in results for k, v in r["train"].items()]
        raise SystemExit(f"Not reporting speeds: the runners computed different things. Epoch "
                         f"losses differ by {worst:.2e} relative ({where}), above {TOLERANCE[dtype]:g} "
                         f"for {dtype}:\n" + "\n".join(lines))
    return worst


RAW = {"torch": "torch loop", "keras": "keras.fit"}
RAW_INFER = {"torch": "module, no_grad", "keras": "predict_on_batch"}


def _cell(rec) -> str:
    return f"{rec['img_s']:.1f} ({rec['iqr'][0]:.1f}–{rec['iqr'][1]:.1f})"


def table(results: list[dict], args, agreement: dict) -> list[str]:
    lines = [f"Training: img/s per epoch, median (IQR) over {args.repeats} epochs after a warm-up "
             f"epoch; {args.images} images {args.image_size}×{args.image_size}, batch "
             f"{args.batch_size}, {args.dtype}, SGD momentum. *ratio* = tlbridge's time ÷ the framework's "
             f"(the bar: ≤ 1.05 torch, ≤ 1.10 keras); *first* = the first call's seconds "
             f"(graph tracing included); *mem* = peak resident memory above the process's, MiB.",
             "",
             "| backbone | backend | framework | tlbridge | ratio | first (fw / tl) | mem (fw / tl) | losses agree to |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        raw, ours = r["train"]["raw"], r["train"]["tl"]
        ratio = raw["img_s"] / ours["img_s"]
        mark = "" if ratio <= BOUND[r["backend"]] else " **over**"
        lines.append(f"| {r['backbone']} | {r['backend']} ({r['device']}) | {RAW[r['backend']]} "
                     f"{_cell(raw)} | {_cell(ours)} | {ratio:.2f}{mark} | {raw['first']:.1f} s / "
                     f"{ours['first']:.1f} s | {raw['memory'] / 2**20:.0f} / {ours['memory'] / 2**20:.0f}"
                     f" | {agreement[r['backbone']]:.0e} |")
    lines += ["", "Inference: img/s, median (IQR), same images and batch.", "",
              "| backbone | backend | framework features | tl.features | framework logits | tl.logits | ratio (logits) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        i = r["infer"]
        ratio = i["raw logits"]["img_s"] / i["tl logits"]["img_s"]
        lines.append(f"| {r['backbone']} | {r['backend']} | {RAW_INFER[r['backend']]} "
                     f"{_cell(i['raw features'])} | {_cell(i['tl features'])} | "
                     f"{_cell(i['raw logits'])} | {_cell(i['tl logits'])} | {ratio:.2f} |")
    versions = {}
    for r in results:
        versions.update(r["versions"])
    threads = "; ".join(sorted({r["threads"] for r in results}))
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {threads}; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
              f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; TF32: "
              + ", ".join(f"{r['backend']} {r['tf32']}" for r in results[:2]) + ". Versions: "
              + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
              "", f"Command: `.venv/bin/python benchmarks/speed.py {' '.join(args.backbones)}"
              + (f" --image-size {args.image_size}" if args.image_size != 64 else "")
              + (f" --batch-size {args.batch_size}" if args.batch_size != 32 else "")
              + (f" --images {args.images}" if args.images != 256 else "")
              + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
              + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")
              + (f" --backends {args.backends}" if args.backends else "") + "`"]
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["backbone"] for r in results}, key=[r["backbone"] for r in results].index)
    bars = [("torch", "raw", "torch loop"), ("torch", "tl", "tl torch"),
            ("keras", "raw", "keras.fit"), ("keras", "tl", "tl keras")]
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(names), 3.6))
    width = 0.2
    for k, (backend, runner, label) in enumerate(bars):
        vals, errs = [], []
        for n in names:
            r = next((r for r in results if r["backbone"] == n and r["backend"] == backend), None)
            rec = r["train"][runner] if r else None
            vals.append(rec["img_s"] if rec else 0)
            errs.append([rec["img_s"] - rec["iqr"][0], rec["iqr"][1] - rec["img_s"]] if rec else [0, 0])
        ax.bar(np.arange(len(names)) + (k - 1.5) * width, vals, width, yerr=np.array(errs).T,
               label=label, capsize=2)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("training images / s")
    ax.legend(fontsize=8)
    ax.set_title("tlbridge vs the plain framework (median, IQR)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbones", nargs="+", help="portable backbones, e.g. resnet50 mobilenet_v2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="images per epoch")
    p.add_argument("--repeats", type=int, default=5, help="measured epochs (after one warm-up)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backends", default=None, help="comma-separated; default: every installed one")
    p.add_argument("--out", default=None, help="folder for speed.md/.json/.png (default benchmarks/out)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_backend(args.worker, args.backbones[0], args)))
        return

    import tlbridge as tl
    from _out import OUT, write_table

    unknown = [b for b in args.backbones if b not in tl.list_backbones(portable=True)]
    if unknown:
        raise SystemExit(f"Unknown portable backbone(s) {unknown}. Expected some of "
                         f"{tl.list_backbones(portable=True)}.")
    backends = args.backends.split(",") if args.backends else tl.available_backends()
    results, agreement = [], {}
    for name in args.backbones:
        rs = []
        for backend in backends:
            print(f"{name} on {backend} ...", file=sys.stderr, flush=True)
            rs.append(_worker(backend, name, args))
        agreement[name] = check_losses(rs, args.dtype)
        results += rs
    lines = table(results, args, agreement)
    print("\n".join(lines))
    out = args.out or OUT
    os.makedirs(out, exist_ok=True)
    if args.out:
        with open(os.path.join(out, "speed.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    else:
        write_table("speed", lines)
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "loss_agreement": agreement}, f, indent=1)
    plot(results, os.path.join(out, "speed.png"))


if __name__ == "__main__":
    main()

"""Training and inference speed of tlbridge against the plain framework, on each backend.

    .venv/bin/python benchmarks/speed.py resnet50 mobilenet_v2 efficientnet_b0
    .venv/bin/python benchmarks/speed.py seed_vgg --image-size 32 --batch-size 16 --repeats 3
    .venv/bin/python benchmarks/speed.py minilm_l6 --texts 256 --text-repeats 3

For each portable backbone and each installed engine (torch, Keras on TensorFlow, Keras on JAX:
a process each, KERAS_BACKEND set), the runners train one model each, tlbridge's all built from
one seed (so the same weights), on the same random images and the same batch order, SGD lr 1e-3
momentum 0.875 (a fresh optimizer state each epoch, as each `fine_tune(epochs=1)` call starts
one), BCE from logits:
  torch: a plain torch loop on the tlbridge-built nn.Module (torchvision's own model for
         torchvision's architectures)  vs  tl.fine_tune
  keras: keras.fit (Keras' own SGD) on the tlbridge-built keras.Model  vs  tl.fine_tune, and,
         for resnet50/mobilenet_v2/efficientnet_b0, keras.applications' own model under
         keras.fit ("app": what a Keras user picks instead; another computation, so outside
         the float64 check below)
  --compiled: also a tl.compile(model)'d model (torch.compile; XLA on Keras-on-TF).
The FLOP/s column divides img/s x training FLOPs per image (counted: benchmarks/_flops.py) by
this machine's fp32 matmul peak, measured once per run before the timed runs.
Text: minilm_l6 (all-MiniLM-L6-v2, its packaged pretrained weights) trains on --texts English
texts of 8-60 words (benchmarks/_texts.py: the prose of the Python documentation, no download),
each batch padded to its own longest text by tl.data.texts; the torch loop and keras.fit get
exactly those batches (keras.fit as a tf.data.Dataset whose length dimension is open, so it
traces once, not once per length; see TextRunners._setup_keras), over --text-repeats epochs.
The runners take turns one epoch at a time (so a slow minute of the machine hits all of
them), after one warm-up epoch each; an epoch is timed as the whole call a user makes
(`fine_tune(epochs=1)`, `fit(epochs=1)`, the loop). Inference compares tl.features and
tl.logits with the framework's own per-batch call (predict_on_batch, module under no_grad).

No speed is reported for a computation that differs: before timing, every runner trains fresh
float64 models for two short epochs, and their epoch losses must agree across all runners of
every engine (the app runner aside) to 1e-9 (with --dtype float64 the measured epochs too), else the script stops
with the figures (see `verify` for why float32 losses cannot be the check). Each backend runs in its own process (no thread pools
competing); the runners of one backend share that process. Peak memory is probed apart, each
runner alone in a fresh process (a sampling thread would slow the timed runs).

Writes benchmarks/out/speed.md (docs/speed.md's table) and speed_summary.md (the README's few
rows; both filled in by benchmarks/fill_readme.py), speed.json (every timing) and speed.png. On a machine with a GPU, Keras runs on it (TF places
the model there); tlbridge's torch backend trains on the CPU (no device support yet), and the
table states each backend's device and TF32 setting.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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
import _texts  # noqa: E402

# Momentum 0.875, not the classic 0.9: Keras' SGD casts its momentum through a float32 tensor
# (keras/src/optimizers/sgd.py: ops.cast(self.momentum, variable.dtype); 0.9 -> 0.89999998),
# so with 0.9 keras.fit in float64 leaves torch by 1e-8 after two steps and the same-computation
# check below could not pass. 0.875 is exact in both precisions; the speed is the same.
LR, MOMENTUM, SEED = 1e-3, 0.875, 0
TOLERANCE = 1e-9                                # float64 losses of the runners (see verify)
CHECK_BATCHES = 2
OTHER = ("app",)                                # runners of another computation: no check
GOAL = 1.05                                     # issue 21: tl within this factor of the user's pick
TEXT = ("minilm_l6",)                           # text backbones timed: packaged weights, tokenizer


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
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _summary(times: list[float], images: int) -> dict:
    rates = images / np.asarray(times)
    q1, med, q3 = np.percentile(rates, [25, 50, 75])
    return {"img_s": float(med), "iqr": [float(q1), float(q3)], "seconds": [float(t) for t in times]}


# ------------------------------------------------------------------------------- one backend
def is_text(name: str) -> bool:
    """A text backbone (token inputs): timed on texts, with its packaged weights and tokenizer."""
    from tlbridge import zoo
    return name in zoo.PORTABLE and zoo.PORTABLE[name].inputs == "tokens"


def _data(args, dtype, n, name=""):
    if is_text(name):                       # texts (a list of str) and labels (N, 1)
        x, y = _texts.texts(args.texts, seed=SEED)
        return x[:n], y[:n, None].astype(dtype)
    rng = np.random.default_rng(SEED)
    s = args.image_size
    x = rng.normal(size=(args.images, s, s, 3)).astype(dtype)
    y = (rng.random((args.images, 1)) > 0.5).astype(dtype)
    return x[:n], y[:n]


def _model(tl, backend, name, args, dtype):
    if is_text(name):                       # the real weights: the check runs where users train
        m = tl.load_backbone(name, weights="pretrained", backend=backend, dtype=dtype)
    else:
        m = tl.load_backbone(name, backend=backend, dtype=dtype, seed=SEED,
                             input_shape=(args.image_size, args.image_size, 3))
    return tl.replace_head(m, 1, seed=SEED + 1)


def samples(args, name: str) -> int:
    return args.texts if is_text(name) else args.images


def repeats(args, name: str) -> int:
    """Measured epochs: a text epoch costs several image epochs, so text rows take fewer."""
    return args.text_repeats if is_text(name) else args.repeats


class Runners:
    """The framework's own training and inference ("raw") and tlbridge's ("tl") on two models
    built from one seed, over the same data; an epoch is given its batch order."""

    def __init__(self, tl, backend, name, args, dtype, n):
        self.tl, self.args, self.dtype, self.name = tl, args, dtype, name
        self.x, self.y = _data(args, dtype, n, name)
        self.base = _model(tl, backend, name, args, dtype)
        self.ours = _model(tl, backend, name, args, dtype)
        self.ours_compiled = (tl.compile(_model(tl, backend, name, args, dtype))
                              if args.compiled else None)
        self.app = None
        self.infer_x = self.inference_inputs()
        getattr(self, f"_setup_{backend}")()

    def runs(self, check: bool = False) -> dict:
        """runner -> its epoch. check: the runners of tlbridge's computation only (the
        keras.applications model is another computation: timed, never in the float64 check)."""
        runs = {"raw": self.raw_epoch, "tl": self.tl_epoch}
        if self.ours_compiled is not None:
            runs["tlc"] = functools.partial(self.tl_epoch, compiled=True)
        if self.app is not None and not check:
            runs["app"] = self.app_epoch
        return runs

    @functools.lru_cache(maxsize=None)
    def order(self, repeat):
        """The batch order tl.data gives fine_tune for this repeat (cached: drawn once, before
        the timed epochs)."""
        return self.tl.data.arrays(self.x, self.y, batch_size=self.args.batch_size,
                                   seed=repeat).plan(0)[0]

    def prepare(self, repeat):
        """Whatever the runners share for this repeat, made before the timed epochs."""
        self.order(repeat)

    def inference_inputs(self):
        return self.x

    def describe(self, n_rep: int) -> dict:
        return {}

    def tl_epoch(self, repeat, compiled=False):
        ds = self.tl.data.arrays(self.x, self.y, batch_size=self.args.batch_size, seed=repeat,
                                 dtype=self.dtype)
        h = self.tl.fine_tune(self.ours_compiled if compiled else self.ours, ds, epochs=1,
                              optimizer=self.tl.optim.SGD(LR, momentum=MOMENTUM), progress=False,
                              feature_cache=False, seed=repeat)
        return float(h["loss"][-1])

    # -- torch: a plain loop over the nn.Module, a new torch.optim.SGD per epoch
    def _setup_torch(self):
        import torch

        net, b = self.base.native, self.args.batch_size
        xt = torch.from_numpy(self.x).permute(0, 3, 1, 2).contiguous()
        yt = torch.from_numpy(self.y)

        def raw_epoch(repeat):
            order = self.order(repeat)
            idxs = (torch.from_numpy(order[i:i + b]) for i in range(0, len(order), b))
            return _torch_loop(net, ((xt[idx], yt[idx]) for idx in idxs))

        def raw_infer(which):
            net.eval()
            with torch.no_grad():
                for i in range(0, len(xt), b):
                    xb = xt[i:i + b]
                    (net.backbone(xb) if which == "features" else net(xb)).numpy()

        self.raw_epoch, self.raw_infer, self.info = raw_epoch, raw_infer, _torch_info()

    # -- keras: compile + fit (Keras' own SGD, momentum slots zeroed per epoch), predict_on_batch
    def _setup_keras(self):
        import keras

        km, fm, b = self.base.native, self.base.state["feature_model"], self.args.batch_size
        _compile(keras, km, self.dtype, _fit_loss(keras))

        def fit_epoch(model, repeat):
            order = self.order(repeat)
            for v in getattr(model.optimizer, "momentums", []):
                v.assign(np.zeros(v.shape, v.dtype))
            with _floatx(keras, self.dtype):  # fit casts numpy floats to floatx
                h = model.fit(self.x[order], self.y[order], batch_size=b, epochs=1,
                              shuffle=False, verbose=0)
            return float(h.history["loss"][0])

        raw_epoch = functools.partial(fit_epoch, km)
        if self.name in APPS and not getattr(self.args, "no_apps", False):
            self.app = _app_model(keras, self.name, self.args.image_size, self.dtype)
            self.app_epoch = functools.partial(fit_epoch, self.app)

        def raw_infer(which):
            model = fm if which == "features" else km
            for i in range(0, len(self.x), b):
                np.asarray(model.predict_on_batch(self.x[i:i + b]))

        self.raw_epoch, self.raw_infer, self.info = raw_epoch, raw_infer, _keras_info()


def _compile(keras, km, dtype, loss=None):
    with _floatx(keras, dtype):              # the loss tracker in the model's dtype
        km.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
                   loss=loss or keras.losses.BinaryCrossentropy(from_logits=True))


def _fit_loss(keras):
    """keras.fit's loss on the tlbridge model: Keras' BinaryCrossentropy on TensorFlow; on JAX
    the same formula written out (TensorFlow's sigmoid_cross_entropy_with_logits), because
    Keras 3.15.1 computes a float64 binary_crossentropy in float32 off TensorFlow
    (keras-team/keras#23223: 3e-9 from torch, measured) and the float64 check would fail on
    Keras' rounding, not on a different computation. The speed is the same."""
    if keras.backend.backend() == "tensorflow":
        return None
    ops = keras.ops
    return lambda y, z: ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z)))


# keras.applications' own model of a portable backbone: what a Keras user picks instead
APPS = {"resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2", "efficientnet_b0": "EfficientNetB0"}


def _app_model(keras, name, size, dtype):
    """keras.applications' `name` (weights=None, no top, global average pooling) with a 1-logit
    Dense head, compiled as the tlbridge model's keras.fit is (same SGD, Keras' own
    BinaryCrossentropy): not tlbridge's computation (Keras' init, BatchNorm eps 1.001e-5 or
    1e-3 and momentum 0.99, ResNet50 v1's stride in the 1x1 conv, EfficientNetB0's input
    normalization), so it is timed without the float64 check."""
    keras.utils.set_random_seed(SEED)
    with _floatx(keras, dtype):
        base = getattr(keras.applications, APPS[name])(
            weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
        km = keras.Model(base.input, keras.layers.Dense(1)(base.output))
    _compile(keras, km, dtype)
    return km


def _torch_loop(net, batches) -> float:
    """One epoch of the plain torch loop a user writes: a new torch.optim.SGD, BCE from logits."""
    import torch
    import torch.nn.functional as F
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    net.train()
    losses = []
    for xb, yb in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(net(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    return float(np.mean(losses))


def _torch_info() -> dict:
    import torch
    return {"device": "cpu", "tf32": "n/a (cpu)",
            "threads": f"torch intra-op {torch.get_num_threads()}, "
                       f"inter-op {torch.get_num_interop_threads()}"}


def _keras_info() -> dict:
    import keras
    if keras.backend.backend() == "jax":
        return _jax_info()
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "device": (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                   if gpus else "cpu"),
        "tf32": (str(tf.config.experimental.tensor_float_32_execution_enabled()) if gpus
                 else "n/a (cpu)"),
        "threads": (f"TF intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}, "
                    f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'auto'}")}


def _jax_info() -> dict:
    import jax
    device = jax.devices()[0]
    return {"device": "cpu" if device.platform == "cpu" else device.device_kind,
            "tf32": "n/a (cpu)" if device.platform == "cpu" else
                    f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision}",
            "threads": "XLA (JAX) threads auto"}


class TextRunners(Runners):
    """The runners on texts. tl.data.texts tokenizes once and pads each batch to its own longest
    text; the plain torch loop and keras.fit get exactly those batches, in the same order, made
    before the timed epochs (tokenizing is a one-off a user pays once, not per epoch), so the
    padding each runner computes on is the same. Inference: the texts padded to their longest."""

    def inference_inputs(self):
        return self.tl.tokenize(self.ours, self.x)

    def describe(self, n_rep: int) -> dict:
        """Tokens per text (min, median, max), the padded lengths of the timed batches, and
        the share of their positions that are real tokens."""
        n = self.infer_x["attention_mask"].sum(axis=1)
        masks = [xb["attention_mask"] for r in range(n_rep + 1) for xb, _ in self.batches(r)]
        return {"tokens": [int(n.min()), float(np.median(n)), int(n.max())],
                "batch_lengths": [int(m.shape[1]) for m in masks],
                "real_share": float(sum(m.sum() for m in masks) / sum(m.size for m in masks))}

    @functools.lru_cache(maxsize=None)
    def dataset(self, repeat):
        return self.tl.data.texts(self.x, self.y, model=self.ours, batch_size=self.args.batch_size,
                                  seed=repeat, dtype=self.dtype)

    def order(self, repeat):
        return self.dataset(repeat).plan(0)[0]

    @functools.lru_cache(maxsize=None)
    def batches(self, repeat) -> list:
        """[(x dict, y)] as fine_tune's epoch gets them from the dataset."""
        return list(self.dataset(repeat).epoch(0))

    def prepare(self, repeat):
        self.batches(repeat)
        self.feed(repeat)

    def feed(self, repeat):
        """What the framework's loop reads for this repeat (Keras: a tf.data.Dataset)."""
        return self.batches(repeat)

    def tl_epoch(self, repeat, compiled=False):
        h = self.tl.fine_tune(self.ours_compiled if compiled else self.ours, self.dataset(repeat),
                              epochs=1, progress=False,
                              optimizer=self.tl.optim.SGD(LR, momentum=MOMENTUM),
                              feature_cache=False, seed=repeat)
        return float(h["loss"][-1])

    def _setup_torch(self):
        import torch

        net, b, x = self.base.native, self.args.batch_size, self.infer_x

        def raw_epoch(repeat):
            return _torch_loop(net, (({k: torch.from_numpy(v) for k, v in xb.items()},
                                      torch.from_numpy(yb)) for xb, yb in self.batches(repeat)))

        def raw_infer(which):
            net.eval()
            with torch.no_grad():
                for i in range(0, len(self.x), b):
                    xb = {k: torch.from_numpy(v[i:i + b]) for k, v in x.items()}
                    (net.backbone(xb) if which == "features" else net(xb)).numpy()

        self.raw_epoch, self.raw_infer, self.info = raw_epoch, raw_infer, _torch_info()

    def _setup_keras(self):
        """keras.fit over this repeat's batches as a tf.data.Dataset (from_tensors per batch,
        concatenated, built before the timed epochs): no Python in the loop, and the length
        dimension stays open, so fit traces once. tf.data's autotuning is off: with it on,
        deleting fit's iterator at the end of an epoch waits for the autotuner's thread, up to
        8 s per fit call on this model (profiled: ~UnboundedThreadPool::LogicalThreadWrapper),
        and from a Python generator (Dataset.from_generator) the wait fell into whichever
        runner's epoch collected the iterator's garbage. A keras.utils.PyDataset fixes any
        dimension its first two batches share and fails on a later batch of another length."""
        import keras
        import tensorflow as tf

        km, fm, b, x = self.base.native, self.base.state["feature_model"], self.args.batch_size, self.infer_x
        _compile(keras, km, self.dtype, _fit_loss(keras))

        options = tf.data.Options()
        options.autotune.enabled = False      # see the docstring

        @functools.lru_cache(maxsize=None)
        def feed(repeat):
            parts = [tf.data.Dataset.from_tensors(batch) for batch in self.batches(repeat)]
            return functools.reduce(lambda data, part: data.concatenate(part), parts).with_options(options)

        def raw_epoch(repeat):
            for v in getattr(km.optimizer, "momentums", []):
                v.assign(np.zeros(v.shape, v.dtype))
            with _floatx(keras, self.dtype):
                h = km.fit(self.feed(repeat), epochs=1, verbose=0)
            return float(h.history["loss"][0])

        def raw_infer(which):
            model = fm if which == "features" else km
            for i in range(0, len(self.x), b):
                np.asarray(model.predict_on_batch({k: v[i:i + b] for k, v in x.items()}))

        self.feed = feed
        self.raw_epoch, self.raw_infer, self.info = raw_epoch, raw_infer, _keras_info()


def runners(tl, backend, name, args, dtype, n) -> Runners:
    return (TextRunners if is_text(name) else Runners)(tl, backend, name, args, dtype, n)


@contextlib.contextmanager
def _floatx(keras, dtype):
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


def verify(tl, backend, name, args) -> dict:
    """Both runners on fresh float64 models, two epochs of CHECK_BATCHES batches: the losses
    the orchestrator compares across runners and backends at 1e-9. In float32 the measured
    losses cannot show that: a deep ReLU net at random init amplifies rounding (ResNet-50:
    torch fp32 is 6.5e-3 from fp64 after one SGD step, measured), so fp32 runs of one
    computation drift apart; float64 shows whether the computations are the same."""
    r = runners(tl, backend, name, args, "float64", CHECK_BATCHES * args.batch_size)
    return {k: {"losses": [fn(e) for e in range(2)]} for k, fn in r.runs(check=True).items()}


def probe_memory(engine: str, name: str, runner: str, args) -> dict:
    """One runner alone in a fresh process: peak resident memory over its first two epochs
    (tracing included) above the process after building its model, and on a GPU the device's
    peak. Kept out of the timed runs: the sampling thread would cost them time."""
    import tlbridge as tl

    r = runners(tl, ENGINES[engine], name, args, args.dtype, samples(args, name))
    fn = r.runs()[runner]
    gpu = None
    if engine == "tensorflow":
        import tensorflow as tf
        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.reset_memory_stats("GPU:0")
            gpu = tf
    with PeakRSS() as mem:
        fn(0)
        fn(1)
    out = {"rss": mem.peak}
    if gpu is not None:
        out["device"] = gpu.config.experimental.get_memory_info("GPU:0")["peak"]
    return out


def run_backend(engine: str, name: str, args) -> dict:
    """One engine's runners in this process: the float64 check, then the timed epochs, taking
    turns (forward order on odd repeats, reversed on even: ABBA for two, and every runner
    meets a slow minute of the machine as often as the others), then inference."""
    import tlbridge as tl

    backend = ENGINES[engine]
    check = verify(tl, backend, name, args)
    r = runners(tl, backend, name, args, args.dtype, samples(args, name))
    x, ours, n_rep = r.infer_x, r.ours, repeats(args, name)
    for repeat in range(n_rep + 1):
        r.prepare(repeat)                                  # drawn outside the timed epochs
    runs = r.runs()
    train = {k: {"times": [], "losses": []} for k in runs}
    for repeat in range(n_rep + 1):                        # repeat 0 is the warm-up epoch
        turns = list(runs.items())
        for key, fn in (turns if repeat % 2 else turns[::-1]):    # ABBA: drift hits all
            seconds, loss = _timed(lambda: fn(repeat))
            rec = train[key]
            rec["losses"].append(loss)
            if repeat == 0:
                rec["first"] = seconds
            else:
                rec["times"].append(seconds)

    infer_fns = {"raw features": lambda: r.raw_infer("features"),
                 "tl features": lambda: tl.features(ours, x, batch_size=args.batch_size),
                 "raw logits": lambda: r.raw_infer("logits"),
                 "tl logits": lambda: tl.logits(ours, x, batch_size=args.batch_size)}
    infer = {k: {"times": []} for k in infer_fns}
    for repeat in range(n_rep + 1):
        turns = list(infer_fns.items())
        for key, fn in (turns if repeat % 2 else turns[::-1]):
            seconds, _ = _timed(fn)
            if repeat == 0:
                infer[key]["first"] = seconds
            else:
                infer[key]["times"].append(seconds)

    for table in (train, infer):
        for rec in table.values():
            rec.update(_summary(rec.pop("times"), samples(args, name)))
    return {"backend": backend, "engine": engine, "backbone": name, "check": check,
            "train": train, "infer": infer, "data": r.describe(n_rep), **r.info,
            "versions": _versions(engine)}


def _versions(engine: str) -> dict:
    import tlbridge
    out = {"python": platform.python_version(), "numpy": np.__version__,
           "tlbridge": getattr(tlbridge, "__version__", "?")}
    if engine == "torch":
        import torch
        out["torch"] = torch.__version__
    else:
        import importlib
        import keras
        out.update({engine: importlib.import_module(engine).__version__, "keras": keras.__version__})
    return out


# ------------------------------------------------------------------------------- orchestration
def _worker(engine, name, args, probe=None) -> dict:
    """Run one engine (or one runner's memory probe) in a fresh process; read its JSON back.
    Keras picks its engine once per process, from KERAS_BACKEND."""
    cmd = [sys.executable, os.path.abspath(__file__), name, "--worker", engine,
           *(["--probe", probe] if probe else []),
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--images", str(args.images), "--texts", str(args.texts), "--repeats", str(args.repeats),
           "--text-repeats", str(args.text_repeats), "--dtype", args.dtype,
           *(["--compiled"] if args.compiled else []), *(["--no-apps"] if args.no_apps else [])]
    env = dict(os.environ, TLBRIDGE_BACKEND=ENGINES[engine])
    if engine != "torch":
        env["KERAS_BACKEND"] = engine
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"The {LABEL[engine]} run of {name} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def loss_difference(results: list[dict], part: str = "check") -> tuple[float, str]:
    """The largest relative difference of any runner's epoch loss from torch's tl.fine_tune
    (the first backend's, without torch), and where."""
    ref_r = next((r for r in results if r["backend"] == "torch"), results[0])
    ref = np.asarray(ref_r[part]["tl"]["losses"], float)
    worst, where = 0.0, ""
    for r in results:
        for runner, rec in r[part].items():
            if runner in OTHER:
                continue
            diff = float(np.max(np.abs(np.subtract(rec["losses"], ref)) / np.maximum(np.abs(ref), 1e-300)))
            if diff > worst:
                worst, where = diff, f"{_label(r)} {runner}"
    return worst, where


def check_losses(results: list[dict], part: str = "check") -> float:
    """Stops the benchmark, with the figures, when the runners' float64 losses differ."""
    worst, where = loss_difference(results, part)
    if worst > TOLERANCE:
        lines = [f"  {_label(r)} {k}: {v['losses']}"
                 for r in results for k, v in r[part].items()]
        raise SystemExit(f"Not reporting speeds: the runners computed different things. Their "
                         f"float64 epoch losses differ by {worst:.2e} relative ({where}), above "
                         f"{TOLERANCE:g}:\n" + "\n".join(lines))
    return worst


SHORT = {"raw": "framework loop", "tl": "tl.fine_tune", "tlc": "tl.compile",
         "app": "keras.applications"}
RAW_INFER = {"torch": "module, no_grad", "keras": "predict_on_batch"}
ENGINES = {"torch": "torch", "tensorflow": "keras", "jax": "keras"}   # engine -> tlbridge backend
LABEL = {"torch": "torch", "tensorflow": "Keras on TF", "jax": "Keras on JAX"}


def _memory(rec) -> str:
    mem = rec.get("memory")
    if mem is None:
        return "–"
    text = f"{mem['rss'] / 2**20:.0f}"
    return text + (f" (GPU {mem['device'] / 2**20:.0f})" if "device" in mem else "")


def _ratio(ours, raw) -> tuple[float, float, float]:
    """tlbridge's time over the framework's, per measured epoch (the two ran back to back),
    as median and IQR: steadier than a ratio of medians when the machine's speed drifts."""
    r = np.asarray(ours["seconds"]) / np.asarray(raw["seconds"])
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return float(med), float(q1), float(q3)


def _cell(rec) -> str:
    return f"{rec['img_s']:.1f} ({rec['iqr'][0]:.1f}–{rec['iqr'][1]:.1f})"


def _train_header(results: list[dict], args) -> str:
    images = [r for r in results if not is_text(r["backbone"])]
    texts = [r for r in results if is_text(r["backbone"])]
    head = "Training: "
    if images:
        head += (f"img/s per epoch, median (IQR) over {args.repeats} epochs after a warm-up epoch; "
                 f"{args.images} random images {args.image_size}×{args.image_size}. ")
    for name in dict.fromkeys(r["backbone"] for r in texts):
        d = next(r["data"] for r in texts if r["backbone"] == name)
        head += (f"{name}: texts/s per epoch, median (IQR) over {args.text_repeats} epochs after a "
                 f"warm-up epoch; {args.texts} texts of {_texts.SHORTEST}–{_texts.LONGEST} words "
                 f"(English prose of the Python documentation, {d['tokens'][0]}–{d['tokens'][2]} "
                 f"tokens, median {d['tokens'][1]:.0f}), its packaged pretrained weights, each batch "
                 f"padded to its longest text by tl.data.texts ({min(d['batch_lengths'])}–"
                 f"{max(d['batch_lengths'])} tokens; {d['real_share']:.0%} of the positions are "
                 f"real tokens); the torch loop and keras.fit get the same padded batches "
                 f"(keras.fit as a tf.data.Dataset, length left open: one trace; tf.data "
                 f"autotuning off, see docs/speed.md). ")
    return (head + f"Batch {args.batch_size}, {args.dtype}, SGD lr {LR:g} momentum {MOMENTUM:g}. "
            f"*time ÷* = a runner's epoch time ÷ its counterpart's, epoch by epoch (median, IQR; the "
            f"runners of an engine take turns, in alternating order): ÷ *user's pick* (the "
            f"first row of each engine; the bar for tl.fine_tune: ≤ {GOAL}) and ÷ the same model "
            f"in the framework's own loop; *first* = "
            f"the first call's seconds (graph tracing included); *mem* = peak resident memory of "
            f"the first two epochs above the built model, MiB, each runner alone in a fresh process.")


def _engine(r) -> str:
    return r.get("engine", r["backend"])


def _label(r) -> str:
    return LABEL.get(_engine(r), _engine(r))


def pick(r) -> str:
    """The runner a user would pick instead of tlbridge on this engine: keras.applications'
    model under keras.fit where Keras has one, else the framework's loop on the same model
    (on torch that is torchvision's own model: tlbridge's torch backbones are torchvision's)."""
    return "app" if "app" in r["train"] else "raw"


def runner_label(r, runner) -> str:
    if runner == "app":
        return f"keras.applications.{APPS[r['backbone']]}, keras.fit †"
    if runner == "raw":
        return "torch loop ‡" if r["backend"] == "torch" else "keras.fit, tlbridge's model"
    compiled = {"torch": " (torch.compile)", "tensorflow": " (XLA)"}.get(_engine(r), "")
    return "tl.fine_tune" + (f", tl.compile{compiled}" if runner == "tlc" else "")


def flop_fraction(r, runner, flops: dict) -> float | None:
    """Training FLOP/s of a row as a fraction of the measured fp32 matmul peak (None without a
    count for the backbone)."""
    f = flops.get("flops", {}).get(r["backbone"])
    if not f or not flops.get("peak"):
        return None
    return r["train"][runner]["img_s"] * f["train"] / flops["peak"]["flop_s"]


def _ratio_cell(r, runner, over: str) -> str:
    if runner == over or over not in r["train"]:
        return "—"
    ratio, q1, q3 = _ratio(r["train"][runner], r["train"][over])
    mark = " **over**" if runner.startswith("tl") and over == pick(r) and ratio > GOAL else ""
    return f"{ratio:.2f} ({q1:.2f}–{q3:.2f}){mark}"


def train_rows(results: list[dict], flops: dict) -> list[str]:
    lines = ["| backbone | engine | runner | img/s, median (IQR) | time ÷ user's pick | "
             "time ÷ same model, plain loop | FLOP/s ÷ fp32 peak | first (s) | mem (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        order = [pick(r)] + [k for k in ("raw", "tl", "tlc") if k in r["train"] and k != pick(r)]
        for runner in order:
            rec, frac = r["train"][runner], flop_fraction(r, runner, flops)
            same = _ratio_cell(r, runner, "raw") if runner.startswith("tl") else "—"
            lines.append(f"| {r['backbone']} | {_label(r)} ({r['device']}) | "
                         f"{runner_label(r, runner)} | {_cell(rec)} | "
                         f"{_ratio_cell(r, runner, pick(r))} | {same} | "
                         f"{'–' if frac is None else f'{frac:.2f}'} | {rec['first']:.1f} | "
                         f"{_memory(rec)} |")
    return lines


def _flops_note(flops: dict, results: list[dict]) -> str:
    if not flops.get("peak"):
        return "FLOP/s ÷ fp32 peak: not measured (it needs torch)."
    pk = flops["peak"]
    counts = ", ".join(f"{n} {f['train'] / 1e9:.3g}" for n, f in flops["flops"].items())
    return (f"*FLOP/s ÷ fp32 peak* = img/s × training FLOPs per image ÷ this machine's fp32 "
            f"matmul peak, measured in this run: {pk['flop_s'] / 1e9:.0f} GFLOP/s (torch "
            f"{pk['size']}² matmul, {pk['threads']} threads, best of {pk['repeats']}). Training "
            f"GFLOP per image = 3 × the forward FLOPs counted by torch's FlopCounterMode on "
            f"tlbridge's torch model at the benchmark size: {counts or 'none counted'}; every "
            f"row of a backbone uses its count"
            + (" († keras.applications.ResNet50 is ResNet v1, stride 2 in the 1×1 convolution: "
               "~6% fewer FLOPs than torchvision's v1.5)." if any(
                   r["backbone"] == "resnet50" and "app" in r["train"] for r in results) else "."))


def _apps_note(results: list[dict]) -> str:
    note = "" if not any(r["backend"] == "torch" for r in results) else (" ‡ the plain torch loop trains tlbridge's nn.Module, which for torchvision's "
            "architectures (resnet*, mobilenet_v2, efficientnet_b0, ...) is torchvision's own "
            "model, its classifier replaced by a Linear head: what a torch user picks.")
    if not any("app" in r["train"] for r in results):
        return note
    return note + (" † keras.applications' own model (weights=None, include_top=False, pooling='avg', "
            "a Dense(1) head), what a Keras user picks instead: another computation (Keras' "
            "initializers and BatchNorm eps/momentum, ResNet50 v1's strides, EfficientNetB0's "
            "input normalization layers), so it is timed on the same batches with the same SGD "
            "but left out of the float64 same-computation check.")


def table(results: list[dict], args, agreement: dict, flops: dict | None = None) -> list[str]:
    flops = flops or {}
    lines = [_train_header(results, args) + _apps_note(results), "", *train_rows(results, flops),
             "", _flops_note(flops, results)]
    lines += ["", "Same computation: before timing, every runner trains fresh float64 models for 2 "
              f"epochs of {CHECK_BATCHES} batches; their epoch losses agree to "
              + ", ".join(f"{a['float64']:.0e} ({n})" for n, a in agreement.items())
              + f" (bar {TOLERANCE:g}, else no speed is reported)."
              + ("" if args.dtype == "float64" else
                 " The measured float32 runs drift apart by " + ", ".join(
                     f"{a['drift']:.0e} ({n})" for n, a in agreement.items())
                 + " in their epoch losses: rounding amplified by training (most from random "
                   "init), as much between torch's own float32 and float64 runs.")]
    lines += ["", "Inference: img/s (texts/s), median (IQR), same inputs and batch (texts padded "
              "to the longest of them).", "",
              "| backbone | engine | framework features | tl.features | framework logits | tl.logits | ratio (logits) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        i = r["infer"]
        ratio, q1, q3 = _ratio(i["tl logits"], i["raw logits"])
        lines.append(f"| {r['backbone']} | {_label(r)} | {RAW_INFER[r['backend']]} "
                     f"{_cell(i['raw features'])} | {_cell(i['tl features'])} | "
                     f"{_cell(i['raw logits'])} | {_cell(i['tl logits'])} | {ratio:.2f} ({q1:.2f}–{q3:.2f}) |")
    return lines + _machine(results, args)


def _machine(results: list[dict], args) -> list[str]:
    versions = {}
    for r in results:
        versions.update(r["versions"])
    threads = "; ".join(sorted({r["threads"] for r in results}))
    tf32 = {_label(r): r["tf32"] for r in results}
    return ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; {threads}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}; TF32: "
            + ", ".join(f"{k} {v}" for k, v in tf32.items()) + ". Versions: "
            + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            "", f"Command: `{command(args)}`"]


def command(args) -> str:
    return (f".venv/bin/python benchmarks/speed.py {' '.join(args.backbones)}"
            + (f" --image-size {args.image_size}" if args.image_size != 64 else "")
            + (f" --batch-size {args.batch_size}" if args.batch_size != 32 else "")
            + (f" --images {args.images}" if args.images != 256 else "")
            + (f" --repeats {args.repeats}" if args.repeats != 7 else "")
            + (f" --texts {args.texts}" if args.texts != 256 else "")
            + (f" --text-repeats {args.text_repeats}" if args.text_repeats != 3 else "")
            + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")
            + (f" --engines {args.engines}" if getattr(args, "engines", None) else "")
            + (" --compiled" if getattr(args, "compiled", False) else "")
            + (" --no-apps" if getattr(args, "no_apps", False) else ""))


def summary(results: list[dict], args, flops: dict) -> list[str]:
    """The README's few rows: per backbone, tlbridge against the user's pick on each engine,
    the fastest of each side, and the fastest tlbridge runner's FLOP/s fraction."""
    engines = list(dict.fromkeys(_engine(r) for r in results))
    lines = [f"Training img/s (texts/s), tlbridge `fine_tune` / what a user picks instead (torch: "
             f"a torch loop on torchvision's model; Keras: keras.applications' model under "
             f"keras.fit), median of {args.repeats} interleaved epochs, batch {args.batch_size}, "
             f"{args.image_size}×{args.image_size}, {args.dtype}, {os.cpu_count()} CPU cores; (×): "
             f"tlbridge's epoch time ÷ the pick's. The last column: the fastest tlbridge row's "
             f"training FLOP/s ÷ this machine's measured fp32 matmul peak"
             + (f" ({flops['peak']['flop_s'] / 1e9:.0f} GFLOP/s)" if flops.get("peak") else "")
             + ". Full table, method and FLOP counts: [docs/speed.md](docs/speed.md).", "",
             "| backbone | " + " | ".join(LABEL[e] for e in engines)
             + " | fastest: tlbridge / plain | FLOP/s ÷ peak |",
             "|---|" + "---|" * (len(engines) + 2)]
    for name in dict.fromkeys(r["backbone"] for r in results):
        rs = {_engine(r): r for r in results if r["backbone"] == name}
        cells = []
        for e in engines:
            r = rs.get(e)
            if r is None:
                cells.append("–")
                continue
            ratio = _ratio(r["train"]["tl"], r["train"][pick(r)])[0]
            cells.append(f"{r['train']['tl']['img_s']:.0f} / {r['train'][pick(r)]['img_s']:.0f} "
                         f"({ratio:.2f}×)")
        best_tl = max(rs.values(), key=lambda r: r["train"]["tl"]["img_s"])
        best_pl = max(rs.values(), key=lambda r: r["train"][pick(r)]["img_s"])
        frac = flop_fraction(best_tl, "tl", flops)
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {best_tl['train']['tl']['img_s']:.0f} ({_label(best_tl)}) / "
                       f"{best_pl['train'][pick(best_pl)]['img_s']:.0f} ({_label(best_pl)}) | "
                     + ("–" if frac is None else f"{frac:.2f}") + " |")
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["backbone"] for r in results))
    bars = list(dict.fromkeys((_engine(r), k) for r in results for k in r["train"]))
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * len(bars) * len(names), 3.8))
    width = 0.8 / len(bars)
    for k, (engine, runner) in enumerate(bars):
        vals, errs = [], []
        for n in names:
            r = next((r for r in results if r["backbone"] == n and _engine(r) == engine), None)
            rec = r["train"].get(runner) if r else None
            vals.append(rec["img_s"] if rec else 0)
            errs.append([rec["img_s"] - rec["iqr"][0], rec["iqr"][1] - rec["img_s"]] if rec else [0, 0])
        label = f"{LABEL[engine]}: {SHORT[runner]}"
        ax.bar(np.arange(len(names)) + (k - (len(bars) - 1) / 2) * width, vals, width,
               yerr=np.array(errs).T, label=label, capsize=2)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("training images (texts) / s")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("tlbridge vs what a user picks instead, per engine (median, IQR)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbones", nargs="+",
                   help="portable backbones, e.g. resnet50 mobilenet_v2, or minilm_l6 (texts)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="images per epoch")
    p.add_argument("--texts", type=int, default=256, help="texts per epoch (text backbones)")
    p.add_argument("--repeats", type=int, default=7, help="measured epochs (after one warm-up)")
    p.add_argument("--text-repeats", type=int, default=3,
                   help="measured epochs of a text backbone (each costs several image epochs)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--engines", default=None,
                   help="comma-separated of torch, tensorflow, jax (Keras' engines); default: "
                        "every installed one")
    p.add_argument("--backends", default=None,
                   help="comma-separated tlbridge backends (keras: both its engines)")
    p.add_argument("--compiled", action="store_true",
                   help="also time a tl.compile(model)'d model: torch.compile, XLA on Keras-on-TF "
                        "(slow on the CPU: docs/speed.md#compiled-steps-tlcompilem)")
    p.add_argument("--no-apps", action="store_true",
                   help="leave out the keras.applications rows")
    p.add_argument("--no-flops", action="store_true",
                   help="skip the fp32 peak and FLOP count (a torch process)")
    p.add_argument("--out", default=None, help="folder for speed.md/.json/.png (default benchmarks/out)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes (a process each)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _arguments(argv)
    if args.worker and args.probe:
        print(json.dumps(probe_memory(args.worker, args.backbones[0], args.probe, args)))
        return
    if args.worker:
        print(json.dumps(run_backend(args.worker, args.backbones[0], args)))
        return

    import tlbridge as tl

    known = [b for b in tl.list_backbones(portable=True) if not is_text(b) or b in TEXT]
    unknown = [b for b in args.backbones if b not in known]
    if unknown:
        raise SystemExit(f"Unknown portable backbone(s) {unknown}. Expected some of {known} "
                         f"(the text backbones with packaged weights and tokenizer: {TEXT}).")
    engines = chosen_engines(tl, args)
    flops = {} if args.no_flops else measure_flops(args)
    results, agreement = [], {}
    for name in args.backbones:
        rs = []
        for engine in engines:
            if is_text(name) and engine == "jax":
                continue                    # the text runners feed keras.fit through tf.data
            print(f"{name} on {LABEL[engine]} ...", file=sys.stderr, flush=True)
            rs.append(_worker(engine, name, args))
            if not args.no_memory:
                for runner in rs[-1]["train"]:
                    rs[-1]["train"][runner]["memory"] = _worker(engine, name, args, runner)
        agreement[name] = {"float64": check_losses(rs, "check")}
        if args.dtype == "float64":
            agreement[name]["float64"] = max(agreement[name]["float64"], check_losses(rs, "train"))
        else:
            agreement[name]["drift"] = loss_difference(rs, "train")[0]
        results += rs
    write(results, args, agreement, flops)


def chosen_engines(tl, args) -> list[str]:
    """--engines, or --backends (keras: each Keras engine installed), else every installed one."""
    import importlib.util
    installed = [e for e in ENGINES if ENGINES[e] in tl.available_backends()
                 and (e == "torch" or importlib.util.find_spec(e) is not None)]
    if args.engines:
        wanted = args.engines.split(",")
    elif args.backends:
        wanted = [e for e in installed if ENGINES[e] in args.backends.split(",")]
    else:
        wanted = installed
    missing = [e for e in wanted if e not in installed]
    if missing:
        raise SystemExit(f"Expected engines among the installed {installed}; received {missing}. "
                         f"Install the missing one (pip install 'tlbridge[jax]' for Keras on JAX) "
                         f"or leave it out of --engines.")
    return wanted


def measure_flops(args) -> dict:
    """The fp32 matmul peak and the image backbones' training FLOPs, in a torch process of its
    own (benchmarks/_flops.py), before the timed runs; {} without torch."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return {}
    images = [b for b in args.backbones if not is_text(b)]
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_flops.py"),
           *images, "--image-size", str(args.image_size)]
    proc = subprocess.run(cmd, env=dict(os.environ, TLBRIDGE_BACKEND="torch"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Measuring the fp32 peak and FLOPs failed:\n{proc.stderr[-4000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def write(results: list[dict], args, agreement: dict, flops: dict) -> None:
    """speed.md (docs/speed.md's block), speed_summary.md (the README's), speed.json, speed.png."""
    from _out import OUT, write_table
    lines, short = table(results, args, agreement, flops), summary(results, args, flops)
    print("\n".join(lines))
    out = args.out or OUT
    os.makedirs(out, exist_ok=True)
    if args.out:                                  # a folder of its own: trials, tests
        for name, body in (("speed", lines), ("speed_summary", short)):
            with open(os.path.join(out, f"{name}.md"), "w") as f:
                f.write("\n".join(body) + "\n")
    else:
        write_table("speed", lines)
        write_table("speed_summary", short)
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "loss_agreement": agreement,
                   "flops": flops}, f, indent=1)
    plot(results, os.path.join(out, "speed.png"))


if __name__ == "__main__":
    main()

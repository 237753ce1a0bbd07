"""float32 judged on every portable backbone, by measures that stay put where kinks flip.

A deep ReLU net has pre-activations within float32 rounding of zero at every batch; which of them
flip depends on the CPU's kernels, and one flip moves a gradient tensor by up to 50%. So one
batch's gradient error is no measure. Three are (docs/parity.md, "float32"):
  - forward: the loss, the logits, the input of every nonlinearity and the BatchNorm statistics
    after the pass — continuous in the weights and inputs, so a flip upstream moves them by no
    more than the value that flipped;
  - gradients: per tensor, the median over BATCHES seeded batches of each backend's error;
  - kink flips: ReLU, ReLU6 and max-pool choices that float32 decides differently from float64,
    counted for both backends over the same batches.
Each backend is measured against float64 (torch) on the same float32-grid weights and batch.
Keras fails on a tensor whose error is significantly above FP32_C x torch's (with a floor), batch
by batch (a sign test over the batches), on a median above the ceiling, and on a flip count
significantly above FP32_C x torch's. Significance, not a line through two medians of rounding
noise: one tensor's median ratio moved from under 4 to 4.5 with the thread count alone.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from . import api, devices, inputs, parity, registry, validation, zoo

BATCHES = 12
FLOOR = {"forward": 1e-6, "grads": 1e-5}   # errors below these are float32's own rounding
ALPHA = 1e-3                                 # flip and excess tests: one-sided binomial tail


@dataclass(frozen=True)
class Setup:
    """The batches fp32 is judged on: 32x32 images (or 12 tokens), eval batch 4, train 8."""
    shape: tuple = (32, 32, 3)
    eval_batch: int = 4
    train_batch: int = 8
    batches: int = BATCHES

    def batch(self, training: bool) -> int:
        return self.train_batch if training else self.eval_batch


def setup(name: str) -> Setup:
    return Setup(shape=(16,)) if zoo.PORTABLE[name].inputs == "tokens" else Setup()


def flips(kind: str, a: np.ndarray, truth: np.ndarray, pool=None) -> tuple[int, int]:
    """(decisions float32 took differently from float64, decisions taken) at one site, its
    tensors in torch's layout (a max-pool's NCHW)."""
    if kind == "relu":
        return int(np.count_nonzero((a > 0) != (truth > 0))), truth.size
    if kind == "relu6":
        return int(np.count_nonzero(((a > 0) != (truth > 0)) | ((a > 6) != (truth > 6)))), truth.size
    if kind == "maxpool":
        wa, wt = _windows(a, pool), _windows(truth, pool)
        ia, it = wa.argmax(-1), wt.argmax(-1)
        # a different index counts only where float64 tells the two values apart (no tie)
        picked = np.take_along_axis(wt, ia[..., None], -1)[..., 0]
        return int(np.count_nonzero((ia != it) & (picked != wt.max(-1)))), it.size
    return 0, 0


def _windows(x: np.ndarray, pool) -> np.ndarray:
    """(N, C, Ho, Wo, k*k) max-pool windows of NCHW x, padded with -inf as torch pads."""
    size, stride, pad = pool
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    w = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(2, 3))
    w = w[:, :, ::stride, ::stride]
    return w.reshape(*w.shape[:4], size * size)


def activations(m, x, training: bool):
    """The backend's ([(kind, input, pool)], logits) of one forward pass (backends/contract.py)."""
    x = validation.check_inputs(x, m.inputs, m.dtype)
    return registry.load(m.backend).activations(m, x, bool(training))


RUNS = {"torch": ("torch", False), "torch_cl": ("torch", True), "keras": ("keras", False)}
"""The float32 runs: torch in its default layout, torch with channels_last convolutions (the
kernels TensorFlow runs on the CPU), and Keras."""


@contextlib.contextmanager
def _run(s: parity.Suite, name: str):
    backend, cl = RUNS[name]
    m = s.models[backend, "float32"]
    if cl:
        registry.load("torch").channels_last(m, True)
    try:
        yield m
    finally:
        if cl:
            registry.load("torch").channels_last(m, False)


@contextlib.contextmanager
def _still(m, training: bool):
    """BatchNorm momentum 0 in train mode: batch statistics, running statistics left exactly as
    they were (new = 1 x old + 0 x batch on both backends)."""
    be = registry.load(m.backend)
    old = be.swap_batchnorm_momentum(m, 0.0) if training else None
    try:
        yield
    finally:
        if training:
            be.swap_batchnorm_momentum(m, old)


@dataclass
class Batch:
    """One batch: per run, forward and gradient errors per tensor, and flips."""
    forward: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    flips: dict = field(default_factory=dict)
    decisions: int = 0
    zero_level: dict = field(default_factory=dict)
    zeros: set = field(default_factory=set)


def _forward(s, x, training: bool, runs, out: Batch) -> dict:
    """Forward errors and flips of each run against float64; returns each run's sites, in
    torch's layout."""
    t64 = s.models["torch", "float64"]
    with _still(t64, training):
        truth, z64 = activations(t64, inputs.cast(x, "float64"), training)
    seen = {}
    for name in runs:
        with _run(s, name) as m, _still(m, training):
            sites, z = activations(m, x, training)
        sites = _lined_up(name, sites, truth)
        err = {f"{i:03d} {kind}": parity.rel_diff(t, a)
               for i, ((kind, a, _), (_, t, _)) in enumerate(zip(sites, truth))}
        err["logits"] = parity.rel_diff(z64, z)
        counted = [flips(kind, a, t, pool) for (kind, a, pool), (_, t, _) in zip(sites, truth)]
        out.forward[name], seen[name] = err, sites
        out.flips[name] = sum(c for c, _ in counted)
        out.decisions = sum(n for _, n in counted)
    return seen


def _lined_up(name: str, sites: list, truth: list) -> list:
    """A run's sites in torch's layout: Keras' NHWC tensors where torch's are NCHW (a
    convolution net), as they are where torch's are channels-last too (ConvNeXt's GELU)."""
    out = []
    for (kind, a, pool), (tkind, t, _) in zip(sites, truth):
        if a.ndim == 4 and a.transpose(0, 3, 1, 2).shape == t.shape:
            a = a.transpose(0, 3, 1, 2)
        if kind != tkind or a.shape != t.shape:
            raise AssertionError(f"{name}'s nonlinearity {len(out)} ({kind}, {a.shape}) does not "
                                 f"line up with torch's ({tkind}, {t.shape})")
        out.append((kind, a, pool))
    if len(sites) != len(truth):
        raise AssertionError(f"{name} has {len(sites)} nonlinearities, torch {len(truth)}")
    return out


def _truth_with(s, x64, y64, training: bool, sites) -> dict:
    """float64 gradients taken with another run's kink decisions (backends/torch/probe.py)."""
    t64 = s.models["torch", "float64"]
    with _still(t64, training), registry.load("torch").decided(t64, sites):
        return api.bce_loss_and_grads(t64, x64, y64, training=training)[1]


def measure(s: parity.Suite, x, y, training: bool, runs=("torch_cl", "keras")) -> Batch:
    """One batch: forward quantities and flips, then the gradients, each against float64 taken
    with that run's own kink decisions, and the BatchNorm statistics after the pass (TF32 off).
    The models are left as the suite's reset() puts them."""
    with devices.precision(tf32=False):
        return _measure(s, x, y, training, runs)


def _measure(s, x, y, training, runs) -> Batch:
    out = Batch()
    sites = _forward(s, x, training, runs, out)
    x64, y64 = inputs.cast(x, "float64"), y.astype(np.float64)
    t64 = s.models["torch", "float64"]
    l64, g64 = api.bce_loss_and_grads(t64, x64, y64, training=training)
    w64 = api.get_weights(t64)
    out.zeros = parity.zero_set(g64)
    for name in runs:
        with _run(s, name) as m:
            loss, g = api.bce_loss_and_grads(m, x, y.astype(np.float32), training=training)
            stats = parity.stat_errors(api.get_weights(m), w64) if training else {}
        truth = _truth_with(s, x64, y64, training, sites[name]) if out.flips[name] else g64
        out.grads[name] = parity.rel_errors(g, truth, skip=out.zeros)
        out.forward[name].update(stats, loss=parity.rel_diff(l64, loss))
        out.zero_level[name] = parity.zero_level(g, out.zeros)
    if training:        # the passes moved running statistics; eval passes change nothing
        s.reset(frozen=False)
    return out


def upper_tail(n: int, k: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p): the one-sided tail both tests below read."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


def flip_p_value(keras: int, torch: int, c: float = parity.FP32_C) -> float:
    """P[X >= keras] for X ~ Binomial(keras + torch, c / (1 + c)): how surprising Keras' flips
    would be if its flip rate were c x torch's (both counted over the same batches). Small:
    Keras flips more than c x torch."""
    return upper_tail(keras + torch, keras, c / (1.0 + c))


def excess_p_value(keras, ref, floor: float, c: float = parity.FP32_C) -> tuple[int, float]:
    """(n, P[X >= n]) for X ~ Binomial(batches, 1/2), n the batches in which Keras' error on one
    tensor is above max(floor, c x the reference's on the same batch): how surprising n would be
    if Keras' error were c x the reference's (half the batches above, half below). Small: Keras
    is above c x the reference on this tensor, beyond the batch-to-batch spread."""
    keras, ref = np.asarray(keras, float), np.asarray(ref, float)
    n = int(np.count_nonzero(keras > np.maximum(floor, c * ref)))
    return n, upper_tail(keras.size, n, 0.5)


def batches_to_fail(batches: int = BATCHES) -> int:
    """The fewest batches over the bar (of `batches`) that fail a tensor at ALPHA."""
    return next(n for n in range(batches + 1) if upper_tail(batches, n, 0.5) < ALPHA)


@dataclass
class Judgement:
    """Medians over batches per tensor, and flip totals, for one backbone and BatchNorm mode,
    per float32 run (RUNS). Keras is judged against `ref`: torch with channels_last
    convolutions, the kernels TensorFlow itself runs (docs/parity.md, "Where Keras' float32
    error comes from"); torch's default layout is reported beside it."""
    forward: dict          # run -> {tensor: median error}
    grads: dict
    flips: dict            # run -> flips summed over the batches
    decisions: int         # kink decisions per run over the batches
    batches: int
    zero_level: dict       # run -> worst over batches
    zeros: set
    per_batch: dict        # "forward"/"grads" -> run -> {tensor: [error per batch]}
    ref: str = "torch_cl"

    def excess(self, what: str, k: str) -> tuple[int, float]:
        """(batches where Keras is above max(floor, FP32_C x ref), p-value): excess_p_value."""
        d = self.per_batch[what]
        return excess_p_value(d["keras"][k], d[self.ref][k], FLOOR[what])

    def failures(self) -> list[str]:
        out = []
        for what in ("forward", "grads"):
            d = getattr(self, what)
            for k, e in d["keras"].items():
                t = d[self.ref][k]
                n, p = self.excess(what, k)
                if p < ALPHA or max(e, t) > parity.FP32_CEILING:
                    out.append(f"{what} {k}: {self.ref} {t:.2g}, keras {e:.2g} (medians); keras "
                               f"above max({FLOOR[what]:g}, {parity.FP32_C:g} x {self.ref}) in "
                               f"{n} of {self.batches} batches (p = {p:.2g})")
        if self.p_value() < ALPHA:
            out.append(f"kink flips: keras {self.flips['keras']}, {self.ref} {self.flips[self.ref]} "
                       f"(p = {self.p_value():.2g} for keras <= {parity.FP32_C:g} x {self.ref})")
        return out

    def p_value(self) -> float:
        return flip_p_value(self.flips["keras"], self.flips[self.ref])

    def ratio(self, what: str, ref: str | None = None) -> float:
        """The median over tensors of Keras' median error / the reference's (the headline)."""
        d, ref = getattr(self, what), ref or self.ref
        return float(np.median([d["keras"][k] / max(d[ref][k], 1e-300) for k in d[ref]]))

    def most_excess(self) -> tuple[int, str]:
        """(the most batches any tensor is above its bar in, that tensor): how near the bar."""
        counts = [(self.excess(w, k)[0], f"{w} {k}") for w in ("forward", "grads")
                  for k in getattr(self, w)["keras"]]
        return max(counts)

    def worst(self, what: str, run: str) -> tuple[float, str]:
        d = getattr(self, what)[run]
        k = max(d, key=d.get)
        return d[k], k


def _per_batch(batches: list, what: str) -> dict:
    first = getattr(batches[0], what)
    return {run: {k: [float(getattr(b, what)[run][k]) for b in batches] for k in first[run]}
            for run in first}


def _medians(per_batch: dict) -> dict:
    return {run: {k: float(np.median(v)) for k, v in d.items()} for run, d in per_batch.items()}


def judge(s: parity.Suite, training: bool, setup_: Setup | None = None,
          runs=("torch_cl", "keras")) -> Judgement:
    """float32 of each run over setup_.batches seeded batches (seeds 1, 2, ...)."""
    setup_ = setup_ or setup(s.name)
    signature = s.models["torch", "float64"].inputs
    s.reset(frozen=False)
    batches = []
    for seed in range(1, setup_.batches + 1):
        x, y = parity.batch(signature, setup_.batch(training), s.num_outputs, seed=seed,
                            dtype="float32")
        batches.append(measure(s, x, y, training, runs))
    per = {what: _per_batch(batches, what) for what in ("forward", "grads")}
    return Judgement(_medians(per["forward"]), _medians(per["grads"]),
                     {r: sum(b.flips[r] for b in batches) for r in runs},
                     sum(b.decisions for b in batches), len(batches),
                     {r: max(b.zero_level[r] for b in batches) for r in runs},
                     set.union(*(b.zeros for b in batches)), per)

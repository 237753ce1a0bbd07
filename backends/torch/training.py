"""Training steps on PyTorch: torch.optim itself (its formulas are the ones tlbridge documents)."""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from tlbridge import inputs
from tlbridge.errors import CompileError, DataError
from tlbridge.losses import Loss
from tlbridge.optim import OptimizerConfig

from . import parallel as par
from .compute import loss_fn, multi_loss, task_counts, to_nchw

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(device_type: str, precision: str) -> None:
    """Mixed precision runs the forward pass under torch.autocast(device_type): refuse, before
    any step, a torch that has no autocast there (MPS gained float16 autocast in torch 2.5)."""
    try:
        from torch.amp.autocast_mode import is_autocast_available
        available = is_autocast_available(device_type)
    except ImportError:         # an older torch: autocast on cuda and cpu only
        available = device_type in ("cuda", "cpu")
    if not available:
        raise DataError(f"Expected torch.autocast to support device type {device_type!r} for "
                        f"precision={precision!r}; received torch {torch.__version__}, which has "
                        f"no autocast there (on 'mps' it arrived in torch 2.5). Upgrade torch, "
                        f"or train with precision='fp32'.")


def check_bf16(device: torch.device) -> None:
    """bf16 on an NVIDIA GPU before Ampere (compute capability < 8.0) has no bfloat16 tensor
    cores (torch emulates it, slowly, or fails): refused before the first step."""
    if device.type != "cuda" or torch.version.hip:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise DataError(f"Expected a GPU with bfloat16 support (NVIDIA compute capability 8.0, "
                        f"Ampere, or newer) for precision='bf16'; received {device} with compute "
                        f"capability {major}.{minor}. Train with precision='fp16' (loss scaling) "
                        f"or 'fp32'.")


def check_compiler(device: torch.device) -> None:
    """torch.compile's inductor writes C++ for the CPU (a C++ compiler: g++ or $CXX) and Triton
    kernels for a GPU: refuse before the first step, naming what is missing, rather than fail
    inside the first step's compilation or fall back to eager without saying so."""
    if device.type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception as exc:        # InvalidCxxCompiler, or a search that fails itself
            raise CompileError(
                f"Expected a C++ compiler for tl.compile(m) on the CPU (torch.compile's inductor "
                f"builds C++ kernels; it looked for {config.cpp.cxx!r}, or $CXX); received none "
                f"that runs ({type(exc).__name__}). Install one (apt-get install g++, or "
                f"xcode-select --install on macOS) or set CXX, or call tl.compile(m, False).") from exc
    elif device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            raise CompileError(
                f"Expected Triton for tl.compile(m) on {device} (torch.compile's inductor writes "
                f"Triton kernels for GPUs); received a torch {torch.__version__} without a "
                f"working triton. pip install triton (the version your torch names), or call "
                f"tl.compile(m, False).")


def compiled_forwards(net, compile: bool):
    """(forward, head) to train with: torch.compile'd when `compile` (inductor compiles the
    forward and, through AOTAutograd, its backward; the loss and the optimizer update stay
    eager), else the module's own. The compiled ones share the module's parameters."""
    head = getattr(net, "apply_head", None)        # a gate's net has none
    if not compile:
        return net, head
    return torch.compile(net), None if head is None else torch.compile(head)


def grouped_convolutions(convs) -> bool:
    return any(conv.groups > 1 for conv in convs)


def channels_last_steps(net, precision: str, parallel, device: torch.device) -> bool:
    """Convolutions run in channels_last (NHWC) memory where that layout is the faster one
    (2-core CPU, fine_tune epochs at 64x64, docs/speed.md "channels_last"):
    - bf16 on any device: oneDNN's and cuDNN's bf16 kernels take NHWC (ResNet-50's bf16 step
      1.52x fp32 against 1.32x in NCHW).
    - fp32 on the CPU, nets with grouped or depthwise convolutions, whose NCHW kernels are
      torch's slow ones: MobileNetV2 1.33x, EfficientNet-B0 1.33x, MobileNetV3-S 1.32x. Plain
      convolution nets stay NCHW: ResNet-18 ran 0.83x in channels_last, ResNet-50 1.00x.
    fp64 and fp16 keep NCHW. The weights move for the fine_tune call (close() moves them back);
    one process only (DDP buckets keep NCHW gradients)."""
    convs = [mod for mod in net.modules() if isinstance(mod, torch.nn.Conv2d)]
    if parallel is not None or not convs:
        return False
    float32 = precision == "fp32" and next(net.parameters()).dtype == torch.float32
    on = precision == "bf16" or (float32 and device.type == "cpu" and grouped_convolutions(convs))
    if on:
        net.to(memory_format=torch.channels_last)
    return on


def _depthwise_forward(mod, dtype, x):
    with torch.autocast(x.device.type, enabled=False):
        y = type(mod).forward(mod, x.float())
    return y.to(dtype)


def float32_depthwise(net, precision: str, device: torch.device) -> list:
    """bf16 on the CPU: depthwise convolutions run in float32, their output rounded to bf16
    (Keras on TensorFlow does the same, backends/keras/mixed.py). oneDNN's bf16 depthwise
    kernels are its slow ones: MobileNetV2's bf16 step ran 0.74x fp32 with them and 1.11x
    without, EfficientNet-B0 0.58x and 1.02x (docs/devices-and-data-parallel.md). Returns
    (module, forward) pairs, made once so a compiled step sees the same objects each time."""
    if precision != "bf16" or device.type != "cpu":
        return []
    return [(mod, functools.partial(_depthwise_forward, mod, torch.bfloat16))
            for mod in net.modules() if isinstance(mod, torch.nn.Conv2d)
            and mod.groups > 1 and mod.groups == mod.in_channels]


@contextlib.contextmanager
def forwards_replaced(pairs):
    for mod, forward in pairs:
        mod.forward = forward
    try:
        yield
    finally:
        for mod, _ in pairs:
            del mod.forward


class Trainer:
    """One optimizer over every parameter, in tlbridge's groups; frozen ones have no gradient
    and torch.optim skips them (no update, no state, no weight decay)."""

    def __init__(self, net, cfg: OptimizerConfig, groups: list[tuple[float, list[str]]],
                 regularizer=None, anchors: dict | None = None, loss=None,
                 precision: str = "fp32", parallel=None, compile: bool = False):
        self.net = net
        self.loss = Loss() if loss is None else loss
        self.device = next(net.parameters()).device
        self.precision = precision
        if precision != "fp32":
            check_autocast(self.device.type, precision)
        if precision == "bf16":
            check_bf16(self.device)
        # fp16: dynamic loss scaling (2^16 to start, halved on inf/NaN, doubled after 2000 steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.parallel = parallel        # tlbridge.parallel.Plan, or None for one process
        self.channels_last = channels_last_steps(net, precision, parallel, self.device)
        self.depthwise = float32_depthwise(net, precision, self.device)
        if compile:
            check_compiler(self.device)
        self._net_fn, self._head_fn = compiled_forwards(net, compile)
        self._ddp_module, self._ddp_key = None, None
        self._parallel_ready = False    # DDP and global BatchNorm set up for this epoch
        self.last_parts = None          # multi-task: the last step's per-task losses
        self.last_rows = None           # the rows the last step's forward pass trained on
        params = dict(net.named_parameters())
        self.names = {id(p): n for n, p in params.items()}
        param_groups = [{"params": [params[n] for n in names], "lr": lr} for lr, names in groups]
        if cfg.name == "sgd":
            self.opt = torch.optim.SGD(param_groups, lr=groups[0][0], momentum=cfg.momentum,
                                       nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                       foreach=False)
        else:
            cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
            self.opt = cls(param_groups, lr=groups[0][0], betas=tuple(cfg.betas), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, foreach=False)
        self.reg = regularizer
        self.steps: dict[str, int] = {}     # updates so far, per parameter (torch SGD keeps none)
        self.set_anchors(anchors or {})

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current loss scale (GradScaler's); None otherwise."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def set_anchors(self, anchors: dict) -> None:
        dtype = next(self.net.parameters()).dtype
        self.anchors = {n: torch.as_tensor(np.array(a), dtype=dtype, device=self.device)
                        for n, a in anchors.items()}

    def _penalty(self):
        """L2-SP: alpha/2 ||w - w0||^2 over trainable backbone weights, beta/2 ||w||^2 over the head."""
        alpha, beta = self.reg
        total = None
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("backbone."):
                term = (alpha / 2) * torch.sum((p - self.anchors[name]) ** 2)
            else:
                term = (beta / 2) * torch.sum(p ** 2)
            total = term if total is None else total + term
        return total

    def _forward(self, forward):
        """Mixed precision: autocast, and BatchNorm as in Keras' own mixed policy: statistics
        and normalisation in float32 (torch's CPU and cuDNN kernels accumulate a bf16/fp16
        input in float32, with float32 weights and running statistics), the output in bf16,
        rounded once. Casting BatchNorm's input up and its output down around the kernel gave
        the same values and cost ResNet-50's bf16 step 13% (docs/devices-and-data-parallel.md)."""
        if self.precision == "fp32":
            return forward()
        with torch.autocast(self.device.type, dtype=_AMP[self.precision]), \
                forwards_replaced(self.depthwise):
            z = forward()
        return z.float()                # the loss in float32

    def _wrap_ddp(self) -> None:
        """DDP over the epoch's trainable set (multi-task: task_log_vars enters the loss
        outside forward, which DDP cannot track, so those sum with a flat all_reduce);
        rebuilt when unfreezing changes the set."""
        if self.loss.name == "multi":
            return
        key = tuple(n for n, p in self.net.named_parameters() if p.requires_grad)
        if self._ddp_key != key:
            self._ddp_module, self._ddp_key = par.wrap(self.net), key

    def _step(self, forward, y: np.ndarray, lrs: list[float], summed: bool = False):
        """summed: the backward pass already sums gradients over ranks (DDP)."""
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        plan = self.parallel
        if plan is not None:
            par.enter_step()
        loss, parts, counts = self._loss(self._forward(forward), y)
        scale = self.scaler.get_scale() if self.scaler is not None else None
        reg = self._backward(loss)
        if plan is not None:
            loss = self._sum_over_ranks(loss, parts, counts, summed)
        if not self._optimizer_step(scale):
            return float(loss.detach()), reg
        if plan is not None and plan.bn_sync == "local":
            par.broadcast_buffers(self.net)
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    name = self.names[id(p)]
                    self.steps[name] = self.steps.get(name, 0) + 1
        return float(loss.detach()), reg

    def _loss(self, z, y: np.ndarray):
        """The batch loss (data-parallel: this rank's share of the global batch's mean), the
        multi-task per-task losses (else None) and, data-parallel, the global task counts."""
        plan = self.parallel
        self.last_rows = (int(z.shape[0]),)     # what this rank trained on, as computed
        yt = torch.from_numpy(y).to(self.device)
        parts = counts = None
        if self.loss.name == "multi" and plan is not None:   # global counts, log-vars once
            counts = task_counts(torch.from_numpy(self._y_global).to(self.device), self.loss)
            loss, parts = multi_loss(z, yt, self.loss, getattr(self.net, "task_log_vars", None),
                                     counts=counts, first=plan.rank == 0)
        elif self.loss.name == "multi":
            loss, parts = multi_loss(z, yt, self.loss, getattr(self.net, "task_log_vars", None))
            self.last_parts = parts.cpu().numpy().astype(np.float64)
        elif plan is not None:          # this rank's share of the global batch's mean
            loss = loss_fn(z, yt, self.loss, rows=self._rows)
        else:
            loss = loss_fn(z, yt, self.loss)
        return loss, parts, counts

    def _backward(self, loss) -> float:
        """Gradients of the loss plus the L2-SP penalty (fp16: scaled); returns the penalty."""
        plan = self.parallel
        total = loss
        reg = 0.0
        if self.reg is not None:
            penalty = self._penalty()
            if penalty is not None:
                reg = float(penalty.detach())
                if plan is None or plan.rank == 0:      # counted once in the summed gradient
                    total = loss + penalty
        if self.scaler is not None:
            total = self.scaler.scale(total)
        if plan is not None:
            with par.guard("gradient"):
                total.backward()
        else:
            total.backward()
        return reg

    def _sum_over_ranks(self, loss, parts, counts, summed: bool):
        """The reported loss (and task losses) summed over ranks, in the same collective as the
        gradients unless DDP already summed those (summed=True)."""
        shares = loss.detach().reshape(1) if parts is None else \
            torch.cat([loss.detach().reshape(1), parts])
        shares = par.all_reduce(shares) if summed else par.all_reduce_grads(self.net, shares)
        loss = shares[0]
        if parts is not None:
            parts = shares[1:]
            parts = torch.where(counts > 0, parts, torch.full_like(parts, float("nan")))
            self.last_parts = parts.cpu().numpy().astype(np.float64)
        return loss

    def _optimizer_step(self, scale) -> bool:
        """The update; False when fp16 loss scaling skipped it (inf/NaN gradients: the scale
        went down below `scale`, the one the step started with)."""
        if self.scaler is None:
            self.opt.step()
            return True
        self.scaler.step(self.opt)
        self.scaler.update()
        return not self.scaler.get_scale() < scale

    def _train_mode(self) -> None:
        """Train mode for the epoch's steps (frozen BN stays in eval: TLNet.train), set once:
        nn.Module.train walks every module, 2 ms a call on MobileNetV2, 3% of a step when it
        was set and unset around each one. end_epoch() puts the model back in eval mode;
        inference between steps (a callback's tl.predict) saves and restores the mode."""
        if not self.net.training:
            self.net.train(True)
        if self.parallel is not None and not self._parallel_ready:   # per epoch, whatever
            self._wrap_ddp()                                         # mode the model was in
            if self.parallel.bn_sync == "global":
                par.sync_batchnorm(self.net, True)
            self._parallel_ready = True

    def end_epoch(self) -> None:
        self.net.train(False)
        if self.parallel is not None:
            par.sync_batchnorm(self.net, False)
            self._parallel_ready = False

    def close(self) -> None:
        """Drop the DDP wrapper (its hooks stay idle: a reducer acts only after its own
        forward); a later fine_tune builds its own. A channels_last model goes back to NCHW."""
        self._ddp_module, self._ddp_key = None, None
        if self.channels_last:
            self.net.to(memory_format=torch.contiguous_format)

    def _shard(self, x, y):
        if self.parallel is None:
            return x, y
        n = inputs.length(x)
        self._rows, self._y_global = n, y
        a, b = self.parallel.bounds(n)
        return inputs.rows(x, slice(a, b)), y[a:b]

    def step(self, x: np.ndarray, y: np.ndarray, lrs: list[float]):
        """One optimizer step on a batch, BatchNorm in train mode (frozen BN stays in eval).
        Data-parallel: x, y are the global batch; this rank trains on its share."""
        self._train_mode()
        x, y = self._shard(x, y)
        xt = to_nchw(self.net, x, self.channels_last)
        ddp = self._ddp_module
        if ddp is not None:
            return self._step(lambda: ddp(xt), y, lrs, summed=True)
        return self._step(lambda: self._net_fn(xt), y, lrs)

    def head_step(self, f: np.ndarray, y: np.ndarray, lrs: list[float]):
        """The same step from cached backbone features (backbone frozen, so identical)."""
        self._train_mode()
        f, y = self._shard(f, y)
        ft = torch.from_numpy(f).to(self.device)
        return self._step(lambda: self._head_fn(ft), y, lrs)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state under canonical names: '<slot>/<param name>' and 'step/<name>' (the
        updates so far of every updated parameter, also for SGD, whose torch state has no step:
        the Keras trainer needs it to continue a momentum buffer instead of restarting it)."""
        out = {}
        for p, st in self.opt.state.items():
            name = self.names[id(p)]
            for slot, value in st.items():
                if value is None:
                    continue
                out[f"{slot}/{name}"] = np.asarray(value.detach().cpu().numpy() if torch.is_tensor(value) else value)
        for name, t in self.steps.items():
            out.setdefault(f"step/{name}", np.asarray(float(t), dtype=np.float32))
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        params = dict(self.net.named_parameters())
        self.opt.state.clear()
        self.steps = {}
        for key, value in state.items():
            slot, name = key.split("/", 1)
            p = params[name]
            if slot == "step":
                t = float(np.asarray(value).reshape(-1)[0])
                self.steps[name] = int(round(t))
                if isinstance(self.opt, torch.optim.SGD):
                    continue                    # torch's SGD keeps no step; Adam(W) does
                t = torch.tensor(t, dtype=torch.float32)
            else:
                t = torch.as_tensor(np.array(value), dtype=p.dtype, device=p.device)
            self.opt.state[p][slot] = t


def seed_epoch(m, seed: int) -> None:
    """torch's global generator, which dropout draws from."""
    torch.manual_seed(seed)

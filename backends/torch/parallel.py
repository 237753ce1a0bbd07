"""Data-parallel training on torch.distributed (gloo on the CPU, nccl on GPUs).

Full steps run through DistributedDataParallel, for its bucketed all-reduce that overlaps
the backward pass, with a comm hook that sums (DDP's default averages; tlbridge's shares are
already divided by the global count). DDP is rebuilt whenever gradual unfreezing changes the
trainable set. Head steps on cached features (the module's apply_head, not its forward) and
multi-task heads (task_log_vars enters the loss outside forward) sum their gradients with one
all_reduce over a flat buffer.

BatchNorm across ranks (bn_sync="global"): torch's SyncBatchNorm runs on GPUs only, so
`GlobalBatchNorm` does the same on any device with torch.distributed's all_reduce: forward
sums x and counts, then the centred squares; backward sums dy and dy * (x - mean), and uses
torch's closed-form BatchNorm backward with the global count. Statistics are float32 or
wider whatever the input's dtype; on NCCL they share DDP's process group (_bn_group).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from tlbridge.errors import DistributedError


def init(world: int, rank: int, device: str) -> None:
    """Use the process group torchrun set up (MASTER_ADDR/PORT, RANK, WORLD_SIZE), initialising
    it once: gloo on the CPU; nccl on CUDA, bound to this rank's GPU (set_device and
    device_id, so NCCL's communicator and every collective use the model's GPU)."""
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise DistributedError(f"Expected a process group of {world} ranks (WORLD_SIZE); "
                                   f"received one of {dist.get_world_size()}.")
        return
    if "MASTER_ADDR" not in os.environ:
        raise DistributedError(
            f"Expected a torchrun launch (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set) for "
            f"distributed fine-tuning; received WORLD_SIZE={world} without MASTER_ADDR. Launch "
            f"with: torchrun --nproc_per_node={world} your_script.py")
    timeout = datetime.timedelta(seconds=float(os.environ.get("TLBRIDGE_DIST_TIMEOUT", "300")))
    if not device.startswith("cuda"):
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        return
    gpu = torch.device(device)
    torch.cuda.set_device(gpu)
    try:
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=gpu)
    except (RuntimeError, dist.DistBackendError) as e:
        if "duplicate gpu" in str(e).lower():
            raise _duplicate(e, device) from e
        raise


def _duplicate(e: BaseException, device: str) -> DistributedError:
    return DistributedError(
        f"Expected each rank on its own GPU; received two ranks on one (this one, rank "
        f"{os.environ.get('RANK', '?')}, LOCAL_RANK {os.environ.get('LOCAL_RANK', '?')}, on "
        f"{device}), which NCCL refuses ({str(e).splitlines()[0] if str(e) else ''}). Load "
        f"the model with device='cuda' or 'auto' (each rank takes cuda:LOCAL_RANK), or give "
        f"each rank its own device='cuda:N'.")


_groups: dict = {}


def _bn_group(t: torch.Tensor):
    """The process group GlobalBatchNorm's all-reduces run on.

    NCCL (CUDA): the default group, DDP's own, as torch's SyncBatchNorm does: NCCL advises
    against two communicators in flight at once on one device (NVIDIA/nccl#195). The order is
    the same on every rank: BatchNorm's all-reduces and DDP's bucket launches are issued by
    the one autograd thread of each rank, walking the same graph in the same order, and NCCL
    runs one group's collectives in the order issued.
    gloo (CPU): a group of its own (what the multi-rank CPU tests have always run), created by
    every rank at its first wrap, in the same order."""
    if t.is_cuda:
        return None
    if "bn" not in _groups:
        _groups["bn"] = dist.new_group()
    return _groups["bn"]


def _sum_hook(state, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(
        lambda fut: fut.value()[0])


def wrap(net: nn.Module) -> DistributedDataParallel:
    """DDP over the trainable parameters as they are now, summing gradients over ranks.
    Buffers are not broadcast here: bn_sync='local' copies rank 0's after each step."""
    _bn_group(next(net.parameters()))
    with warnings.catch_warnings():     # newer torch renames it; the meaning is the same
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DistributedDataParallel(net, broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def all_reduce(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a small tensor (the loss shares)."""
    values = values.clone()
    _collective(lambda: dist.all_reduce(values), "loss")
    return values


_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "reset by peer", "socket")


@contextlib.contextmanager
def guard(what: str):
    """A backward pass whose DDP all-reduce fails (a peer died) raises DistributedError."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as e:
        if isinstance(e, dist.DistBackendError) or any(w in str(e).lower() for w in _COMM_WORDS):
            raise _named(e, what) from e
        raise


_entered = {"steps": 0}


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:       # private API: without it, errors cannot name the lagging rank
        return None


def enter_step() -> None:
    """Record in the process group's store that this rank entered one more step, so that a
    rank left waiting in a collective can name the ranks that never arrived."""
    _entered["steps"] += 1
    store = _store()
    if store is not None:
        store.set(f"tlbridge/entered/{dist.get_rank()}", str(_entered["steps"]))


def _missing_ranks() -> str:
    store = _store()
    if store is None:
        return "another rank"
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        behind = [r for r in range(dist.get_world_size())
                  if int(store.get(f"tlbridge/entered/{r}")) < _entered["steps"]]
    except Exception:       # the store lives in rank 0's process (torchrun: in the agent)
        return "rank 0 (which holds the process group's store)" if dist.get_rank() else \
            "another rank"
    return ("rank " + ", ".join(map(str, behind))) if behind else "another rank"


def _named(e: BaseException, what: str) -> DistributedError:
    if "duplicate gpu" in str(e).lower():
        return _duplicate(e, f"cuda:{torch.cuda.current_device()}")
    return DistributedError(
        f"Rank {dist.get_rank()} of {dist.get_world_size()} stopped: {_missing_ranks()} "
        f"did not join the {what} all_reduce of step {_entered['steps']} (it died, or "
        f"hung past TLBRIDGE_DIST_TIMEOUT) ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). The last complete checkpoint is "
        f"intact: resume=True continues from it.")


def _collective(fn, what: str):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:
        raise _named(e, what) from e


def _coalesced(tensors: list, extra: list, collective, what: str) -> torch.Tensor:
    """Run `collective` once on the tensors and `extra` side by side in one flat buffer, write
    the results back into the tensors, and return the part that was `extra`."""
    dtype = tensors[0].dtype if tensors else torch.float64
    flat = torch.cat([t.reshape(-1) for t in tensors] + [e.reshape(-1).to(dtype) for e in extra])
    _collective(lambda: collective(flat), what)
    k = 0
    for t in tensors:
        t.copy_(flat[k:k + t.numel()].view_as(t))
        k += t.numel()
    return flat[k:]


def all_reduce_grads(net: nn.Module, extra: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient, and `extra` (the loss shares), over ranks in one flat
    buffer; returns the summed `extra`."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return _coalesced(grads, [extra], dist.all_reduce, "gradient").to(extra.dtype)


def broadcast_buffers(net: nn.Module) -> None:
    """bn_sync='local': rank 0's BatchNorm running statistics on every rank after each step
    (DistributedDataParallel's broadcast_buffers=True)."""
    bufs = [b for b in net.buffers() if b.is_floating_point()]
    if bufs:
        _coalesced(bufs, [], lambda flat: dist.broadcast(flat, src=0), "BatchNorm buffer")


class _GlobalBatchNormFn(torch.autograd.Function):
    """Statistics and the normalisation run in float32 or wider whatever x's dtype: in float16
    a count past 65504 is inf, and (x - mean)^2 overflows once |x - mean| > 256, while the
    gradients stay finite (a loss scaler would never notice); the output is x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        f64 = torch.float64                  # torch's CPU kernel accumulates in float64
        wide = torch.promote_types(x.dtype, torch.float32)
        count = torch.tensor([x.numel() // max(x.shape[1], 1)], dtype=f64, device=x.device)
        buf = torch.cat([x.sum(dims, dtype=f64), count])
        _collective(lambda: dist.all_reduce(buf, group=_bn_group(x)), "BatchNorm statistics")
        n = buf[-1]
        mean = buf[:-1] / n
        xc = x.to(wide) - mean.to(wide).view(shape)
        sq = (xc * xc).sum(dims, dtype=f64)
        _collective(lambda: dist.all_reduce(sq, group=_bn_group(x)), "BatchNorm statistics")
        var = sq / n
        invstd = torch.rsqrt(var + module.eps)
        _update_running(module, mean, var, n)
        invstd_ = invstd.to(wide).view(shape)
        w = weight.to(wide).view(shape) if weight is not None else 1.0
        y = xc * (invstd_ * w)
        if bias is not None:
            y = y + bias.to(wide).view(shape)
        ctx.save_for_backward(xc, invstd_, weight if weight is not None else torch.ones(0))
        ctx.n, ctx.dims, ctx.shape = n.to(wide), dims, shape   # no device sync
        ctx.has = (weight is not None, bias is not None)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xc, invstd, weight = ctx.saved_tensors
        dims, shape, n = ctx.dims, ctx.shape, ctx.n
        dyw = dy.to(xc.dtype)
        dbeta = dyw.sum(dims, dtype=torch.float64)
        dotp = (dyw * xc).sum(dims, dtype=torch.float64)
        buf = torch.cat([dbeta, dotp])
        _collective(lambda: dist.all_reduce(buf, group=_bn_group(dy)), "BatchNorm gradient")
        c = dbeta.numel()
        gbeta, gdotp = buf[:c].to(xc.dtype).view(shape), buf[c:].to(xc.dtype).view(shape)
        w = weight.to(xc.dtype).view(shape) if ctx.has[0] else 1.0
        k = gdotp * invstd * invstd / n
        dx = (dyw - gbeta / n - xc * k) * (invstd * w)
        dweight = (dotp.to(xc.dtype) * invstd.reshape(-1)) if ctx.has[0] else None
        dbias = dbeta.to(xc.dtype) if ctx.has[1] else None     # autograd casts to their dtype
        return dx.to(dy.dtype), dweight, dbias, None


def _update_running(module, mean, var, n) -> None:
    """Running statistics from the global batch (torch's unbiased variance)."""
    if not module.track_running_stats:
        return
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        m = module.momentum if module.momentum is not None \
            else 1.0 / float(module.num_batches_tracked)
        unbiased = var * (n / torch.clamp(n - 1, min=1))
        module.running_mean.mul_(1 - m).add_(m * mean.to(module.running_mean.dtype))
        module.running_var.mul_(1 - m).add_(m * unbiased.to(module.running_var.dtype))


class GlobalBatchNorm(_BatchNorm):
    """A trainable BatchNorm in train mode normalises with the statistics of every rank's
    rows together; frozen or in eval mode it is torch's own."""

    def forward(self, x):
        if not self.training or (self.weight is not None and not self.weight.requires_grad):
            return super().forward(x)
        return _GlobalBatchNormFn.apply(x, self.weight, self.bias, self)


_GLOBAL_CLASSES: dict[type, type] = {}


def sync_batchnorm(net: nn.Module, on: bool) -> None:
    """Swap the class of every BatchNorm to GlobalBatchNorm (on) and back: the module, its
    parameters, buffers and canonical names stay as they are."""
    for module in net.modules():
        if on and isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
            cls = type(module)
            if cls not in _GLOBAL_CLASSES:
                _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (GlobalBatchNorm, cls), {})
            module._tl_class = cls
            module.__class__ = _GLOBAL_CLASSES[cls]
        elif not on and isinstance(module, GlobalBatchNorm):
            module.__class__ = module.__dict__.pop("_tl_class")

"""Issue 23: what would break, or be silently wrong, the first time tlbridge runs on GPUs,
shown on the CPU. Only device counts and CUDA presence are mocked (no GPU here); every
number comes from real torch / real Keras. benchmarks/gpu_check.py runs the GPU side."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS

from tlbridge import errors, registry

needs_torch = pytest.mark.skipif("torch" not in BACKENDS, reason="torch backend")
needs_keras = pytest.mark.skipif("keras" not in BACKENDS, reason="Keras backend")


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo process group in this process (GlobalBatchNorm's all-reduces)."""
    import torch.distributed as dist
    par = registry.load("torch").parallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield par
    finally:
        par._groups.clear()
        dist.destroy_process_group()


@needs_torch
def test_global_batchnorm_in_float16_keeps_float32_statistics(one_rank_group):
    """Item 6: float16 input, a count of 81,920 per channel (> 65504, float16's largest) and
    |x - mean| > 256: statistics and gradients match float64 BatchNorm to float16 rounding
    (today's main: count inf, running variance inf, input gradient ~20% off)."""
    import torch
    torch.manual_seed(0)
    x64 = (torch.randn(20, 2, 64, 64, dtype=torch.float64) * 300 + 50)
    dy64 = torch.randn_like(x64)
    bn = torch.nn.BatchNorm2d(2).train()
    one_rank_group.sync_batchnorm(bn, True)
    x = x64.half().requires_grad_(True)
    y = bn(x)
    y.backward(dy64.half())
    ref = torch.nn.BatchNorm2d(2).double().train()
    xr = x.detach().double().requires_grad_(True)
    yr = ref(xr)
    yr.backward(dy64.half().double())
    assert y.dtype == torch.float16 and torch.isfinite(bn.running_var).all()
    assert torch.allclose(bn.running_var.double(), ref.running_var, rtol=1e-5)
    assert (y.double() - yr).abs().max() <= 1e-2
    gx = (x.grad.double() - xr.grad).norm() / xr.grad.norm()
    assert gx <= 1e-2
    assert torch.allclose(bn.weight.grad.double(), ref.weight.grad, rtol=1e-3)


@needs_torch
def test_global_batchnorm_shares_ddps_process_group_on_nccl(one_rank_group):
    """Item 8: on CUDA (NCCL) GlobalBatchNorm's all-reduces run on the default group, DDP's,
    as torch's SyncBatchNorm does; a second communicator in flight beside DDP's buckets is
    what NCCL advises against. gloo keeps its own group (the CPU runs' tested path)."""
    import types

    import torch
    assert one_rank_group._bn_group(types.SimpleNamespace(is_cuda=True)) is None
    assert "bn" not in one_rank_group._groups
    assert one_rank_group._bn_group(torch.zeros(1)) is not None

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


def _torchrun(monkeypatch, local_rank: int, gpus: int, world: int = 2):
    """The environment torchrun gives rank `local_rank` on a node with `gpus` GPUs (mocked:
    the count only)."""
    import torch
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@needs_torch
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_under_torchrun_each_rank_takes_its_own_gpu(monkeypatch, rank):
    """Item 1: "cuda" and "auto" resolved to cuda:0 on every rank (NCCL: "Duplicate GPU
    detected"); each rank now takes cuda:LOCAL_RANK, and an explicit cuda:N stays."""
    from tlbridge import devices
    resolve = registry.load("torch").resolve_device
    _torchrun(monkeypatch, rank, gpus=3, world=3)
    assert resolve(devices.normalize("cuda")) == f"cuda:{rank}"
    assert resolve(devices.normalize("auto")) == f"cuda:{rank}"
    assert resolve("cuda:2") == "cuda:2"
    monkeypatch.setenv("WORLD_SIZE", "1")               # no torchrun: the first GPU
    assert resolve(devices.normalize("cuda")) == "cuda:0"


@needs_torch
def test_more_ranks_than_gpus_is_a_tlbridge_error(monkeypatch):
    from tlbridge import devices
    _torchrun(monkeypatch, 2, gpus=2, world=4)
    with pytest.raises(errors.DistributedError, match=r"LOCAL_RANK=2 with 2 GPU\(s\).*"
                                                      r"--nproc_per_node=2"):
        registry.load("torch").resolve_device(devices.normalize("auto"))


@needs_torch
def test_nccl_init_binds_the_ranks_gpu(monkeypatch):
    """Item 1: init_process_group gets device_id (NCCL's communicator on this rank's GPU) after
    torch.cuda.set_device; NCCL's "Duplicate GPU detected" becomes a tlbridge error."""
    import torch
    import torch.distributed as dist
    par = registry.load("torch").parallel
    _torchrun(monkeypatch, 1, gpus=2)
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw.get("device_id"))))
    par.init(2, 1, "cuda:1")
    assert calls == [("set_device", torch.device("cuda:1")), ("nccl", torch.device("cuda:1"))]

    def duplicate(backend, **kw):
        raise dist.DistBackendError("NCCL error: invalid usage, Duplicate GPU detected : rank 1 "
                                    "and rank 0 both on CUDA device 1a000")
    monkeypatch.setattr(dist, "init_process_group", duplicate)
    with pytest.raises(errors.DistributedError, match=r"own GPU.*LOCAL_RANK 1.*device='cuda'"):
        par.init(2, 1, "cuda:0")


@needs_keras
def test_cpu_replicas_run_on_a_machine_with_one_gpu(monkeypatch):
    """Item 10: with one logical GPU (mocked) and cpu_replicas(2), replicas=2 was refused
    because GPUs were always preferred; it now takes the two logical CPUs (and replicas=1
    still the GPU)."""
    import types

    import tensorflow as tf
    par = registry.load("keras").parallel
    seen = {"GPU": ["/device:GPU:0"], "CPU": ["/device:CPU:0", "/device:CPU:1"]}
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [types.SimpleNamespace(name=n) for n in seen[kind]])
    assert par.devices_for(2) == seen["CPU"]
    assert par.devices_for(1) == seen["GPU"]
    with pytest.raises(errors.DistributedError, match="replicas=3"):
        par.devices_for(3)


@needs_torch
def test_bf16_on_a_gpu_before_ampere_is_refused_on_torch(monkeypatch):
    """Item 10: bf16 is checked before training (compute capability mocked)."""
    import torch
    check = registry.load("torch").training.check_bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(errors.DataError, match=r"compute capability 7\.0.*precision='fp16'"):
        check(torch.device("cuda:0"))
    check(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    check(torch.device("cuda:0"))


@needs_keras
def test_bf16_on_a_gpu_before_ampere_is_refused_on_keras(monkeypatch):
    """Item 10: fine_tune(precision='bf16') on a Keras model on a V100 (mocked: the device's
    details) stops before the first step."""
    import tensorflow as tf

    import tlbridge as tl
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="keras", input_shape=(8, 8, 3),
                                         widths=(4,), seed=0), 1, seed=1)
    m.state["device"] = "cuda:0"            # as if it lived on the GPU
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu0"])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda d: {"device_name": "Tesla V100", "compute_capability": (7, 0)})
    x = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(errors.DataError, match=r"Tesla V100.*compute capability 7\.0"):
        tl.fine_tune(m, (x, np.zeros((4, 1), np.float32)), epochs=1, progress=False,
                     precision="bf16")


@needs_torch
def test_torch_mixed_precision_batchnorm_computes_in_float32_and_rounds_its_output_once():
    """Item 10: "BatchNorm in float32" under bf16/fp16, as Keras' own BatchNormalization under
    its mixed policy: statistics and normalisation in float32, float32 weights and running
    statistics, the output in the compute dtype. torch's kernel takes the bf16 input as it is
    and accumulates in float32, so each BatchNorm's output must equal float32 BatchNorm on the
    same input, rounded to bf16 once (a bf16 computation would be off by several bf16 ulps)."""
    import torch

    import tlbridge as tl
    m = tl.replace_head(tl.load_backbone("seed_vgg", backend="torch", input_shape=(8, 8, 3),
                                         widths=(4, 8), batch_norm=True, seed=0), 1, seed=1)
    bns = [mod for mod in m.native.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    seen, worst = set(), []

    def check(mod, args, out):
        seen.add((args[0].dtype, out.dtype, mod.running_mean.dtype, mod.weight.dtype))
        x = args[0].detach().float()                 # exact: every bf16 is a float32
        mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False,
                                                          keepdim=True)
        ref = (x - mean) / torch.sqrt(var + mod.eps) * mod.weight.detach()[None, :, None, None] \
            + mod.bias.detach()[None, :, None, None]
        ulp = ref.abs().clamp_min(1e-2) * 2.0 ** -7   # one bf16 ulp (8-bit significand)
        worst.append(((out.detach().float() - ref).abs() / ulp).max().item())

    for bn in bns:
        bn.register_forward_hook(check)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    tl.fine_tune(m, (x, (x[:, :1, 0, 0] > 0).astype(np.float32)), epochs=1, batch_size=4,
                 progress=False, precision="bf16", feature_cache=False)
    bf16, f32 = torch.bfloat16, torch.float32
    assert seen == {(bf16, bf16, f32, f32)}
    assert max(worst) <= 1.0, worst      # rounded once from float32 (at most 1 ulp, half on
    # average; the reference's own float32 sums differ from the kernel's in the last bits)


@needs_keras
def test_tensorflow_seeing_no_gpu_where_torch_does_is_said_once(monkeypatch):
    """Item 2: plain `tensorflow` (the CPU build) on a GPU machine kept Keras on the CPU in
    silence (TF's own warning is hidden by TF_CPP_MIN_LOG_LEVEL=3). torch's CUDA presence is
    mocked; TensorFlow here really sees no GPU."""
    import warnings

    import torch
    kdev = registry.load("keras").devices
    monkeypatch.setattr(kdev, "_SAID", {"no_gpu": False})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kdev.available()
        kdev.available()
    said = [str(w.message) for w in caught if "TensorFlow sees no GPU" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0]
    assert 'torch sees 2' in said[0] and 'pip install "tlbridge[gpu]"' in said[0]


def test_the_gpu_extra_asks_for_tensorflows_cuda_build():
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    gpu = re.search(r"^gpu = \[(.*)\]$", text, re.M)
    assert gpu and '"tensorflow[and-cuda]' in gpu.group(1)
    assert re.search(r'"torch>=2\.([3-9]|\d\d)', text)      # torch.amp.GradScaler: torch 2.3


@needs_keras
def test_memory_growth_is_set_before_tensorflows_first_gpu_allocation():
    """Item 3: TensorFlow reserves nearly all GPU memory at its first allocation unless memory
    growth is set first; torch in the same process then runs out. Two GPUs are mocked (the
    listing and set_memory_growth); the check is that growth is set for each while
    TensorFlow's context is not yet initialised, by starting the Keras backend alone."""
    import subprocess
    import sys
    code = (
        "import tensorflow as tf\n"
        "from tensorflow.python.eager import context\n"
        "real = tf.config.list_physical_devices\n"
        "tf.config.list_physical_devices = lambda kind=None: (['gpu0', 'gpu1'] if kind == 'GPU'"
        " else real(kind))\n"
        "calls = []\n"
        "tf.config.experimental.set_memory_growth = lambda d, on: calls.append("
        "(d, on, context.context()._context_handle is None))\n"
        "from tlbridge import registry\n"
        "registry.load('keras')\n"
        "print('calls', calls)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "calls [('gpu0', True, True), ('gpu1', True, True)]" in out.stdout, out.stdout


@needs_keras
def test_keras_training_state_lives_on_the_models_device():
    """Item 7: optimizer slots, L2-SP anchors and the fp16 loss scale were created outside
    tf.device: with two logical CPUs and the model on the second (standing for cuda:1: the
    device name is mapped, nothing else), that state sat on CPU:0. Every variable a step
    reads or writes is now on the model's device."""
    import os
    import subprocess
    import sys
    code = (
        "import numpy as np, tlbridge as tl\n"
        "from tlbridge import devices, registry\n"
        "kd = registry.load('keras').devices\n"
        "kd.tf_name = lambda d: '/CPU:1'\n"
        "devices._ALLOW_CPU_FP16 = True\n"
        "m = tl.replace_head(tl.load_backbone('seed_vgg', backend='keras', input_shape=(8, 8, 3),"
        " widths=(4,), batch_norm=True, seed=0), 1, seed=1)\n"
        "x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)\n"
        "tl.fine_tune(m, (x, (x[:, :1, 0, 0] > 0).astype(np.float32)), epochs=1, batch_size=4,"
        " progress=False, precision='fp16', optimizer=tl.optim.Adam(0.01, regularizer='l2sp'))\n"
        "c = m.state['_train']\n"
        "state = [v for t in c.state.values() for v in t.values()] + list(c.anchors.values())\n"
        "state += [c.loss_scale, c.good_steps]\n"
        "print('model', sorted({v.value.device[-5:] for v in m.native.variables}))\n"
        "print('state', len(state), sorted({v.device[-5:] for v in state}))\n")
    env = {**os.environ, "TLBRIDGE_CPU_REPLICAS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model ['CPU:1']" in out.stdout, out.stdout
    assert "state" in out.stdout and "['CPU:1']" in out.stdout.split("state")[1], out.stdout

"""Data-parallel fine-tuning: 2 torch ranks (torchrun, gloo, OMP_NUM_THREADS=1) and 2 Keras
replicas (MirroredStrategy over logical CPU devices) against one process, fp64.

Runs (tests/workers/dp_train.py): seed_vgg with BatchNorm on 37 images in batches of 10, so
the last batch (7) splits 4/3: no sample may be dropped or counted twice.
  0  sgd:global:unfreeze           head in epoch 0, everything in epoch 1 (trainable set changes)
  1  adam:global:freeze_bn_biases  Adam (BN-preceded conv biases frozen: zero true gradient)
  2  sgd:local:k2                  each share's own BatchNorm statistics; two sigmoid outputs
                                   (BCE is a mean over N*K entries, not N)
  3  sgd:global:unfreeze:cache     run 0 with the feature cache in epoch 0 (head steps sharded)
  4  sgd:global:multi              two task heads, missing labels, uncertainty weighting
  5  sgd:global:bf16               a float32 model in mixed precision (bf16)
  6  sgd:global:tokens:unfreeze:cache  the two-input text model (token ids + attention masks,
                                   padded), head on cached features in epoch 0, all in epoch 1
  7  adam:global:lora              LoRA adapters on every conv (base frozen: BatchNorm on its
                                   running statistics); only the adapters and the head train
Every step of every run records the rows each rank / replica trained on (shard_bounds).
keras.applications backbones (Keras' own BatchNormalization) on 2 replicas:
tests/workers/keras_native_replicas.py.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import both_backends

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "dp_train.py"
RUNS = ["sgd:global:unfreeze", "adam:global:freeze_bn_biases", "sgd:local:k2",
        "sgd:global:unfreeze:cache", "sgd:global:multi", "sgd:global:bf16",
        "sgd:global:tokens:unfreeze:cache", "adam:global:lora"]

pytestmark = [both_backends, pytest.mark.slow]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(ROOT / "tests"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **extra}


def _torchrun(args, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(WORKER), "torch", *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600)


@functools.cache
def _worker():
    """tests/workers/dp_train.py as a module: the runs the launched processes make."""
    spec = importlib.util.spec_from_file_location("dp_train", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path):
    from tlbridge import weights as wio
    tensors, meta = wio.load_file(path)
    _FIRST_STEP[str(path)] = float(meta["first"])     # the loss of the run's first step
    _ROWS_AT[str(path)] = eval(meta["rows"])          # (epoch, step, cached, [rows per replica])
    return tensors, eval(meta["loss"])   # a list of floats the worker wrote with repr


_FIRST_STEP: dict = {}
_ROWS_AT: dict = {}      # file -> its process's steps: (epoch, step, cached, [rows per replica])
_STEP_ROWS: dict = {}    # (backend, run) -> [(epoch, step, cached, [rows of rank/replica 0, 1])]


def _rows_by_rank(per_process):
    """Each process's step records -> one record per step with every rank's rows (torch: a
    process per rank, each recording its own; Keras: one process recording both replicas)."""
    out = []
    for steps in zip(*per_process):
        assert len({(e, s, c) for e, s, c, _ in steps}) == 1     # the same step on every rank
        out.append((*steps[0][:3], [n for *_, rows in steps for n in rows]))
    return out


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def torch_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch2") / "w"
    r = _torchrun([str(out), *RUNS])
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [_load(f"{out}.{i}.safetensors") for i in range(len(RUNS))]
    _FIRST_STEP["torch"] = _FIRST_STEP[f"{out}.5.safetensors"]
    _RANK1.update({i: _load(f"{out}.{i}.rank1.safetensors") for i in range(len(RUNS))})
    for i in range(len(RUNS)):
        _STEP_ROWS["torch", i] = _rows_by_rank([_ROWS_AT[f"{out}.{i}.safetensors"],
                                                _ROWS_AT[f"{out}.{i}.rank1.safetensors"]])
    return ranks


_RANK1: dict = {}       # run -> rank 1's (weights, losses)


@pytest.mark.parametrize("i", range(len(RUNS)), ids=RUNS)
def test_every_torch_rank_holds_the_same_weights_and_statistics(torch_ranks, i):
    """Not only rank 0's: ranks that drifted apart (say one that never updates its BatchNorm
    running statistics) would evaluate, early-stop and checkpoint differently."""
    (w0, loss0), (w1, loss1) = torch_ranks[i], _RANK1[i]
    assert _max_diff(w0, w1) == 0.0
    assert loss0 == loss1


@pytest.fixture(scope="module")
def keras_replicas(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras2") / "w"
    r = subprocess.run([sys.executable, str(WORKER), "keras", str(out), *RUNS, "--replicas", "2"],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    replicas = [_load(f"{out}.{i}.safetensors") for i in range(len(RUNS))]
    _FIRST_STEP["keras"] = _FIRST_STEP[f"{out}.5.safetensors"]
    for i in range(len(RUNS)):
        _STEP_ROWS["keras", i] = _rows_by_rank([_ROWS_AT[f"{out}.{i}.safetensors"]])
    return replicas


@pytest.fixture(scope="module")
def one_process():
    """The same runs in this process, one device, per backend."""
    dp_train = _worker()
    import tlbridge as tl
    out = {}
    for backend in ("torch", "keras"):
        for i in (0, 1, 2, 4, 5, 6, 7) if backend == "torch" else (0, 1, 4, 5, 6, 7):
            m, h = dp_train.train(backend, RUNS[i])
            out[backend, i] = tl.get_weights(m), dp_train.losses_of(h)
            if i == 5:
                out[backend, "first5"] = dp_train.first_step(h)
        m, h = dp_train.train(backend, "sgd:global:f32")      # run 5 without bf16
        out[backend, "first_f32"] = dp_train.first_step(h)
    return out


def test_shards_cover_every_row_once():
    from tlbridge.parallel import shard_bounds
    for world in (1, 2, 3, 4):
        for n in range(0, 23):
            parts = [shard_bounds(n, world, r) for r in range(world)]
            rows = [i for a, b in parts for i in range(a, b)]
            assert rows == list(range(n))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("i", [0, 1, 4, 6, 7], ids=[RUNS[0], RUNS[1], RUNS[4], RUNS[6], RUNS[7]])
def test_torch_two_ranks_equal_one_process(torch_ranks, one_process, i):
    (w2, loss2), (w1, loss1) = torch_ranks[i], one_process["torch", i]
    assert _max_diff(w2, w1) <= 1e-12
    assert np.max(np.abs(np.array(loss2) - np.array(loss1))) <= 1e-12
    assert _max_diff(w1, _initial("torch", i == 4, i == 6, i == 7)) > 1e-3  # it trained
    assert len(loss1) == (6 if i == 4 else 2)       # multi-task: loss, loss_sign, loss_green


@pytest.mark.parametrize("i", [0, 1, 4, 6, 7], ids=[RUNS[0], RUNS[1], RUNS[4], RUNS[6], RUNS[7]])
def test_keras_two_replicas_equal_one_process(keras_replicas, one_process, i):
    (w2, loss2), (w1, loss1) = keras_replicas[i], one_process["keras", i]
    assert _max_diff(w2, w1) <= 1e-12
    assert np.max(np.abs(np.array(loss2) - np.array(loss1))) <= 1e-12


def test_feature_cache_shards_head_steps(torch_ranks, keras_replicas):
    """Equal weights alone cannot see a head step that skipped sharding (every rank on the
    whole batch all-reduces to the same mean gradient): each rank's rows are checked too."""
    for ranks in (torch_ranks, keras_replicas):
        assert _max_diff(ranks[3][0], ranks[0][0]) <= 1e-12
    for backend in ("torch", "keras"):
        steps = _STEP_ROWS[backend, 3]
        assert [c for _, _, c, _ in steps] == [True] * 4 + [False] * 4   # head, then full
        _assert_shards(steps)


def _shares(n: int, world: int = 2) -> list[int]:
    from tlbridge.parallel import shard_bounds
    return [b - a for a, b in (shard_bounds(n, world, r) for r in range(world))]


def _assert_shards(steps) -> None:
    """37 rows in batches of 10: 5/5 three times, then the short batch of 7 as 4/3, each
    epoch; every rank trains its shard_bounds share, and the shares add up to the batch."""
    assert _shares(10) == [5, 5] and _shares(7) == [4, 3]
    assert [(e, s) for e, s, _, _ in steps] == [(e, s) for e in range(2) for s in range(4)]
    for _, s, _, rows in steps:
        n = 7 if s == 3 else 10
        assert rows == _shares(n) and sum(rows) == n, (steps, rows)


@pytest.mark.parametrize("backend", ["torch", "keras"])
@pytest.mark.parametrize("i", range(len(RUNS)), ids=RUNS)
def test_every_rank_trains_its_share(torch_ranks, keras_replicas, backend, i):
    _assert_shards(_STEP_ROWS[backend, i])


@pytest.mark.parametrize("i", [0, 1, 2, 3, 4, 6, 7], ids=RUNS[:5] + RUNS[6:])
def test_torch_ranks_equal_keras_replicas(torch_ranks, keras_replicas, i):
    (wt, lt), (wk, lk) = torch_ranks[i], keras_replicas[i]
    assert _max_diff(wt, wk) <= 1e-9
    assert np.max(np.abs(np.array(lt) - np.array(lk))) <= 1e-9


def test_bf16_data_parallel_follows_one_process(torch_ranks, keras_replicas, one_process):
    """Mixed precision composes with data-parallel: 2 ranks / replicas in bf16 keep float32
    weights and follow the one-process bf16 run to bf16 rounding (8-bit mantissa), epoch by
    epoch."""
    for backend, ranks in (("torch", torch_ranks), ("keras", keras_replicas)):
        (w2, loss2), (w1, loss1) = ranks[5], one_process[backend, 5]
        assert {str(v.dtype) for v in w2.values()} == {"float32"}
        loss1, loss2 = np.array(loss1), np.array(loss2)
        assert np.max(np.abs(loss2 - loss1) / loss1) <= 2e-2
        # bf16 really ran: the first step's loss (same weights, same rows) is off the float32
        # run's by bf16 rounding (measured 1e-3 relative), not by float32's (~1e-7: a float32
        # data-parallel step reduces in another order, nothing more); the bf16 one-process run
        # is as near as bf16 allows
        first = _FIRST_STEP[backend]
        to_fp32 = abs(first - one_process[backend, "first_f32"]) / abs(first)
        to_bf16 = abs(first - one_process[backend, "first5"]) / abs(first)
        assert to_fp32 > 1e-4 and to_bf16 < 2e-3, (to_fp32, to_bf16)


@pytest.fixture(scope="module")
def keras_applications():
    """tests/workers/keras_native_replicas.py: a keras.applications backbone (MobileNetV2,
    Keras' own BatchNormalization) on 2 replicas; the measured differences."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" /
                                            "keras_native_replicas.py")],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["keras_batchnorm"] > 10          # the model normalises with Keras' layer
    return out


def test_keras_applications_frozen_on_replicas_equal_one_process(keras_applications):
    """Backbone frozen: its BatchNorm runs on moving statistics, so replicas only split rows."""
    d = keras_applications["frozen"]
    assert d["two_vs_one"] <= 1e-12 and d["trained"] > 1e-3


def test_keras_applications_global_batchnorm_equals_one_process(keras_applications):
    """bn_sync='global' on Keras' own layer (its synchronized moments, E[x^2] - E[x]^2: a
    rounding of 1e-12 in float64 against one process's centred variance), moving statistics
    included."""
    d = keras_applications["global"]
    assert d["two_vs_one"] <= 1e-10 and d["trained"] > 1e-3


def test_keras_applications_local_batchnorm_is_each_halfs(keras_applications):
    """bn_sync='local': the step written out by hand (each half normalised on its own, the
    moving statistics replica 0's alone; replica 1's update would move them by 2e-3)."""
    d = keras_applications["local"]
    assert d["two_vs_by_hand"] <= 1e-12
    assert d["two_vs_one"] > 1e-3 and d["replica1_would_move_stats"] > 1e-4


def test_local_batchnorm_is_not_global(torch_ranks, keras_replicas, one_process):
    """bn_sync='local' normalises each share on its own rows (the same on both backends,
    above), so 2 ranks no longer train what one process trains."""
    for ranks in (torch_ranks, keras_replicas):
        assert _max_diff(ranks[2][0], one_process["torch", 2][0]) > 1e-3


def _initial(backend, multi=False, text=False, lora=False):
    dp_train = _worker()
    import tlbridge as tl
    return tl.get_weights(dp_train.model(backend, multi, text=text, lora=lora))


def test_lora_on_ranks_and_replicas_trains_only_the_adapters_and_the_head(torch_ranks,
                                                                          keras_replicas):
    """Run 7 on 2 torch ranks and 2 Keras replicas: every base weight and BatchNorm statistic
    is still the initial one, every adapter and the head moved (and equal one process, above)."""
    for backend, ranks in (("torch", torch_ranks), ("keras", keras_replicas)):
        w, start = ranks[7][0], _initial(backend, lora=True)
        moved = {k for k in w if not np.array_equal(w[k], start[k])}
        lora = {k for k in w if ".lora_" in k}
        assert len(lora) == 2 * 3 and moved == lora | {"head.weight", "head.bias"}, moved


def test_dying_rank_stops_the_run_and_resume_continues(tmp_path, torch_ranks):
    """Rank 1 exits in epoch 1: torchrun stops rank 0 and names rank 1; the checkpoint holds
    epoch 0, intact; resuming on 2 ranks gives the uninterrupted run's weights, and so does
    resuming it on 2 Keras replicas."""
    from tlbridge import weights as wio
    ckpt = tmp_path / "ckpt"
    r = _torchrun([str(tmp_path / "w"), "sgd:global:unfreeze", "--ckpt", str(ckpt),
                   "--die-at", "1:1"], TLBRIDGE_DIST_TIMEOUT="30")
    assert r.returncode != 0
    log = r.stdout + r.stderr
    assert "rank 1 exits on purpose" in log
    assert "rank      : 1" in log                       # torchrun's root cause names it
    tensors, meta = wio.load_file(ckpt / "last.safetensors")
    assert meta["epoch"] == "0"
    shutil.copytree(ckpt, tmp_path / "ckpt_keras")
    r = _torchrun([str(tmp_path / "w"), "sgd:global:unfreeze", "--ckpt", str(ckpt),
                   "--resume"])
    assert r.returncode == 0, r.stderr[-4000:]
    w, _ = _load(tmp_path / "w.0.safetensors")
    assert _max_diff(w, torch_ranks[0][0]) <= 1e-12
    # the same checkpoint resumed on 2 Keras replicas: checkpoints are portable
    r = subprocess.run([sys.executable, str(WORKER), "keras", str(tmp_path / "k"),
                        "sgd:global:unfreeze", "--ckpt", str(tmp_path / "ckpt_keras"), "--resume",
                        "--replicas", "2"], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    w, _ = _load(tmp_path / "k.0.safetensors")
    assert _max_diff(w, torch_ranks[0][0]) <= 1e-9


def test_dying_rank_named_without_torchrun(tmp_path):
    """Launched by hand (no torchrun agent to stop it), rank 0's collective fails and its
    error names rank 1, the rank that never arrived."""
    port = str(_free_port())
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
               TLBRIDGE_DIST_TIMEOUT="30")
    args = [sys.executable, str(WORKER), "torch", str(tmp_path / "w"), "sgd:global",
            "--die-at", "0:1"]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    err = outs[0][1]
    assert "DistributedError" in err and "Rank 0 of 2 stopped: rank 1 did not join" in err


# -- bad input (in this process: one logical CPU device, no torchrun) -------------------------

def _small(backend):
    import tlbridge as tl
    m = tl.load_backbone("seed_vgg", backend=backend, input_shape=(16, 16, 3), seed=0,
                         batch_norm=True, widths=(4, 8, 8))
    return tl.replace_head(m, 1, seed=1)


def test_more_replicas_than_devices_is_refused():
    import tlbridge as tl
    from tlbridge.errors import DistributedError
    x, y = np.zeros((8, 16, 16, 3), "float32"), np.zeros((8, 1))
    m = _small("keras")
    before = tl.get_weights(m)
    with pytest.raises(DistributedError, match=r"replicas=64 .*cpu_replicas\(64\)"):
        tl.fine_tune(m, (x, y), parallel=tl.Parallel(replicas=64), progress=False)
    assert _max_diff(before, tl.get_weights(m)) == 0


def test_cpu_replicas_after_tensorflow_started_is_refused():
    from tlbridge.backends.keras import cpu_replicas
    from tlbridge.errors import DistributedError
    _small("keras")
    with pytest.raises(DistributedError, match="before TensorFlow initialises"):
        cpu_replicas(3)


def test_bad_parallel_arguments_are_refused(monkeypatch):
    import tlbridge as tl
    from tlbridge.errors import DataError, DistributedError
    x, y = np.zeros((8, 16, 16, 3), "float32"), np.zeros((8, 1))
    m = _small("torch")
    with pytest.raises(DataError, match="replicas= with a Keras model"):
        tl.fine_tune(m, (x, y), parallel=tl.Parallel(replicas=2), progress=False)
    with pytest.raises(DistributedError, match="torchrun --nproc_per_node"):
        tl.fine_tune(m, (x, y), parallel=tl.Parallel(distributed=True), progress=False)
    with pytest.raises(DataError, match="bn_sync"):
        tl.fine_tune(m, (x, y), parallel=tl.Parallel(bn_sync="everywhere"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DataError, match="at least 2 samples with bn_sync='local'"):
        tl.fine_tune(m, (np.zeros((9, 16, 16, 3), "float32"), np.zeros((9, 1))),
                     batch_size=4, parallel=tl.Parallel(bn_sync="local"), progress=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        tl.fine_tune(m, (x, y), progress=False)

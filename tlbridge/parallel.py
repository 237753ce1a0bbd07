"""Data-parallel fine-tuning, written once: how a global batch is split, and what must hold
before a run starts. The collectives are the frameworks' own (backends/*/parallel.py).

Every rank (torch process, or Keras replica) sees the same global batch from tl.data (same
seed); rank r trains on rows bounds(n)[0]:bounds(n)[1] (contiguous, sizes differing by at most
one, so an uneven last batch drops or repeats no sample). Each share's loss is its sum divided
by the *global* count, so the summed gradients are exactly the one-process gradient of the
global batch's mean. bn_sync="global" normalises with the global batch's statistics (sum,
centred sum of squares and count all-reduced), so N ranks train the weights one process
trains on the same global batch; "local" normalises each share on its own, the frameworks'
default (torch DDP then copies rank 0's running statistics to every rank after each step).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import DataError, DistributedError

BN_SYNC = ("global", "local")
CPU_REPLICAS_ENV = "TLBRIDGE_CPU_REPLICAS"


@dataclass(frozen=True)
class Plan:
    world: int
    rank: int
    bn_sync: str = "global"
    strategy: object = field(default=None, compare=False, repr=False)  # Keras: tf.distribute

    def bounds(self, n: int) -> tuple[int, int]:
        """Rows [a, b) of a global batch of n that this rank trains on."""
        return shard_bounds(n, self.world, self.rank)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    base, extra = divmod(int(n), int(world))
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def torch_env() -> tuple[int, int] | None:
    """(world size, rank) when launched by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return world, int(os.environ.get("RANK", "0"))


def local_gpu(gpus: int) -> int:
    """The GPU this process takes for device "cuda"/"auto": LOCAL_RANK under torchrun (one GPU
    per rank on each node: two ranks on one GPU make NCCL stop with "Duplicate GPU detected"),
    else the first."""
    from .errors import DistributedError
    if torch_env() is None:
        return 0
    raw = os.environ.get("LOCAL_RANK", "0") or "0"
    try:
        local = int(raw)
    except ValueError:
        raise DistributedError(f"Expected LOCAL_RANK as an int (torchrun sets it); received "
                               f"{raw!r}.") from None
    if local >= gpus:
        raise DistributedError(
            f"Expected a GPU for each rank on this node (rank LOCAL_RANK trains on cuda:"
            f"LOCAL_RANK); received LOCAL_RANK={local} with {gpus} GPU(s) visible. Launch "
            f"torchrun with --nproc_per_node={gpus} or fewer, pass device='cpu' (gloo), or name "
            f"each rank's GPU yourself with device='cuda:N'.")
    return local


def check_bn_sync(bn_sync) -> str:
    if bn_sync not in BN_SYNC:
        raise DataError(f"Expected bn_sync as one of {list(BN_SYNC)}; received {bn_sync!r}.")
    return bn_sync


def check_batches(sizes, world: int, bn_sync: str) -> None:
    """With bn_sync='local' each share normalises on its own rows: a share of 0 or 1 row has no
    batch statistics (torch refuses one row, and none gives NaN), so it is refused up front."""
    if bn_sync != "local":
        return
    small = [n for n in sizes if n < 2 * world]
    if small:
        raise DataError(
            f"Expected every global batch to give each of the {world} ranks at least 2 samples "
            f"with bn_sync='local'; received a batch of {small[0]}. Use bn_sync='global' (any "
            f"split is exact), a batch size that leaves no short last batch, or drop_last=True "
            f"in tl.data.")


def cpu_replicas_from_env() -> int | None:
    """TLBRIDGE_CPU_REPLICAS=N (Keras engines: N CPU devices before the engine starts)."""
    value = os.environ.get(CPU_REPLICAS_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"Expected {CPU_REPLICAS_ENV} as an int >= 1; received "
                               f"{value!r}.") from None


def replica_pool(gpus: list, cpus: list, n: int, engine: str) -> list:
    """GPUs when there are n of them; else CPU devices, when there are n (a 1-GPU machine runs
    replicas=2 on cpu_replicas(2)): the same rule on every Keras engine."""
    pool = gpus if gpus and (len(gpus) >= n or len(cpus) < n) else cpus
    if n > len(pool):
        raise DistributedError(
            f"Expected replicas <= the devices {engine} sees; received replicas={n} with "
            f"{len(gpus)} GPU(s) and {len(cpus)} CPU device(s) ({pool}). Pass "
            f"replicas={len(pool)}, or make CPU devices first: tl.backends.keras.cpu_replicas({n}) "
            f"(or {CPU_REPLICAS_ENV}={n}) before {engine} starts.")
    return pool[:n]

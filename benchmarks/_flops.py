"""How far a training speed is from the hardware: this machine's fp32 matmul peak, measured, and a
backbone's training FLOPs per image, counted (not written down), for speed.py's FLOP/s column.

    .venv/bin/python benchmarks/_flops.py resnet50 mobilenet_v2 --image-size 64

prints {"peak": {...}, "flops": {backbone: {...}}} as JSON. Both use torch, in a process of
their own (speed.py's orchestrator imports no framework).
"""
from __future__ import annotations

import argparse
import json
import time

PEAK_SIZE, PEAK_REPEATS = 4096, 5


def matmul_peak(size: int = PEAK_SIZE, repeats: int = PEAK_REPEATS, threads: int | None = None) -> dict:
    """fp32 matmul FLOP/s of torch on the CPU, best of `repeats` (the machine's ceiling for dense
    fp32 work: the best run is the one other processes disturbed least). threads: torch's
    intra-op threads (default: what the speed runners get, torch's own default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)                                         # warm-up: thread pool, pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"flop_s": 2 * size ** 3 / best, "size": size, "repeats": repeats,
            "threads": torch.get_num_threads(), "seconds": best}


def training_flops(name: str, image_size: int) -> dict:
    """Training FLOPs per image of tlbridge's torch model of `name` (torchvision's architecture,
    a 1-logit head): forward FLOPs counted by torch.utils.flop_counter.FlopCounterMode on one
    image, times 3 (the backward pass costs about twice the forward: gradients for the inputs
    and for the weights), the usual convention. Multiply-adds count 2 FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import tlbridge as tl
    m = tl.replace_head(tl.load_backbone(name, backend="torch", seed=0,
                                         input_shape=(image_size, image_size, 3)), 1, seed=1)
    net = m.native.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, 3, image_size, image_size))
    forward = int(counter.get_total_flops())
    return {"forward": forward, "train": 3 * forward, "image_size": image_size,
            "counter": "torch.utils.flop_counter.FlopCounterMode"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbones", nargs="*")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--size", type=int, default=PEAK_SIZE, help="matmul side for the peak")
    p.add_argument("--repeats", type=int, default=PEAK_REPEATS)
    args = p.parse_args(argv)
    out = {"peak": matmul_peak(args.size, args.repeats),
           "flops": {n: training_flops(n, args.image_size) for n in args.backbones}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

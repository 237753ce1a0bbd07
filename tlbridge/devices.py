"""Device names tlbridge accepts, the same on both backends: "auto", "cpu", "cuda", "cuda:N",
"mps". Each backend resolves them against what its framework sees (backends/*/devices.py) to
"cpu", "cuda:N" or "mps", which `m.device` reports.

TF32 (NVIDIA Ampere and later): torch leaves it off for matmuls and on for cuDNN convolutions;
TensorFlow turns it on for both. Its 10-bit mantissa moves float32 results by ~1e-3, so the
parity helpers (tl.parity) switch it off on both frameworks while they compare
(`precision(tf32=False)`); elsewhere `set_precision` is the user's choice.
"""
from __future__ import annotations

import contextlib
import re

from . import registry
from .errors import DataError

_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def normalize(device) -> str:
    """Lower case, checked; "cuda" stays "cuda": each backend picks the GPU (torch under
    torchrun: this rank's own, LOCAL_RANK; else the first)."""
    if not isinstance(device, str) or not _NAME.match(device.strip().lower()):
        raise DataError(f"Expected device as 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; received "
                        f"{device!r}.")
    return device.strip().lower()


def unavailable(device: str, available: list[str], backend: str):
    from .errors import DeviceNotAvailableError
    return DeviceNotAvailableError(
        f"Expected a device {backend} can use; received device={device!r}, but it sees "
        f"{available}. Pass one of those, or device='auto' (the first GPU when there is one, "
        f"else the CPU).")


_CHOSEN = {"tf32": None}     # the last set_precision choice (None: each framework's default)
_AT_START: dict = {}         # each backend's TF32 state before tlbridge first changed it


def set_precision(tf32: bool) -> dict:
    """Allow (True) or forbid (False) TF32 in float32 matmuls and convolutions, on every
    backend already imported, and on any backend started later (started_backend); returns
    the previous settings for `restore_precision`."""
    import sys

    previous = {"_chosen": _CHOSEN["tf32"]}
    started = [registry.load(name) for name, module in (("torch", "torch"),
                                                        ("keras", "tensorflow"))
               if module in sys.modules]        # loaded first: under the previous choice
    _CHOSEN["tf32"] = bool(tf32)
    for backend in started:
        previous[backend.NAME] = backend.set_tf32(bool(tf32))
        _AT_START.setdefault(backend.NAME, previous[backend.NAME])
    return previous


def started_backend(name: str, module) -> None:
    """A backend imported after set_precision takes the recorded choice (registry.load)."""
    if _CHOSEN["tf32"] is not None and hasattr(module, "set_tf32"):
        _AT_START.setdefault(name, module.set_tf32(_CHOSEN["tf32"]))


registry.ON_LOAD.append(started_backend)


def restore_precision(previous: dict) -> None:
    """Back to the settings before `set_precision`, also on backends started since then."""
    chosen = previous.get("_chosen")
    for name in registry._loaded:
        if name in previous:
            registry.load(name).set_tf32(previous[name])
        elif chosen is not None:
            registry.load(name).set_tf32(chosen)
        elif name in _AT_START:
            registry.load(name).set_tf32(_AT_START[name])
    _CHOSEN["tf32"] = chosen


@contextlib.contextmanager
def precision(tf32: bool = False):
    """TF32 allowed or not inside the block (parity comparisons run with it off)."""
    previous = set_precision(tf32)
    try:
        yield
    finally:
        restore_precision(previous)


PRECISIONS = ("fp32", "bf16", "fp16")
_ALLOW_CPU_FP16 = False     # tests only: run the fp16 path (loss scaling) on the CPU


# fp16's devices per backend: CUDA GPUs; on torch also Apple's MPS (torch.autocast("mps")
# in float16 since torch 2.5, and torch.amp.GradScaler("mps") has MPS kernels: backends/torch)
FP16_DEVICES = {"torch": ("cuda", "mps"), "keras": ("cuda",)}


def check_precision(precision, dtype: str, device: str, backend: str = "torch") -> str:
    """fine_tune's `precision`: "fp32" (the model's own dtype, fp64 included), or mixed
    "bf16"/"fp16" (float32 master weights, BatchNorm and loss in float32; fp16 adds dynamic
    loss scaling). fp16 needs a GPU (FP16_DEVICES): CPUs have no fast float16 kernels, use
    bf16 there."""
    if precision is None:
        return "fp32"
    if not isinstance(precision, str) or precision.strip().lower() not in PRECISIONS:
        raise DataError(f"Expected precision as one of {list(PRECISIONS)}; received "
                        f"{precision!r}.")
    precision = precision.strip().lower()
    if precision != "fp32" and dtype != "float32":
        raise DataError(f"Expected a float32 model for precision={precision!r} (mixed precision "
                        f"keeps float32 master weights); received a {dtype} model. Load it with "
                        f"dtype='float32', or train with precision='fp32'.")
    if precision == "fp16" and not _ALLOW_CPU_FP16 and \
            not str(device).startswith(FP16_DEVICES.get(backend, ("cuda",))):
        raise DataError(_fp16_refused(device, backend))
    return precision


def _fp16_refused(device: str, backend: str) -> str:
    if str(device).startswith("mps"):       # Keras: TensorFlow has no "mps" device
        return (f"Expected a CUDA GPU for precision='fp16' with a {backend} model; received one "
                f"on 'mps': TensorFlow has no MPS device (with tensorflow-metal an Apple GPU is "
                f"TensorFlow's GPU, which tlbridge names 'cuda:0', and device='mps' resolves "
                f"to it). Load the Keras model with device='cuda:0', train a torch model (torch "
                f"autocasts to float16 on MPS), or use precision='bf16' or 'fp32'.")
    gpus = "CUDA, or Apple MPS on torch" if backend == "torch" else "CUDA"
    return (f"Expected a GPU for precision='fp16' ({gpus}); received a {backend} model on "
            f"{device!r}: CPUs have no fast float16 kernels. Use precision='bf16' on the CPU, "
            f"or move the model with tl.to_device(m, 'cuda').")

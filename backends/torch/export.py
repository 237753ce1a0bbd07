"""tl.export on PyTorch: ONNX through torch.onnx.export (the torch.export-based exporter, which
needs onnxscript), the input as tl.logits takes it (NHWC images), any batch size."""
from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from tlbridge.errors import BackendNotInstalledError, ExportError


class _Serving(nn.Module):
    """The model between the arrays tl.logits takes and named logits: NHWC -> NCHW inside."""

    def __init__(self, net: nn.Module, names: list, outputs: tuple):
        super().__init__()
        self.net, self.names, self.outputs = net, names, outputs

    def forward(self, *args):
        if self.names == ["images"]:
            z = self.net(args[0].permute(0, 3, 1, 2))
        else:
            z = self.net(dict(zip(self.names, args)))
        return tuple(z[:, a:b] for _, a, b in self.outputs)


def _example(m, n: int = 2) -> tuple:
    from .compute import _device
    from .network import DTYPES
    out = []
    for s in m.inputs:
        shape = (n, *(8 if d is None else d for d in s.shape))
        out.append(torch.randn(shape, dtype=DTYPES[m.dtype]) if s.is_float
                   else torch.ones(shape, dtype=torch.int64))
    return tuple(t.to(_device(m.native)) for t in out)


def export_model(m, path: str, format: str, outputs: tuple) -> None:
    if format != "onnx":
        raise ExportError(f"Expected format 'onnx' for a torch model; received {format!r}. A "
                          f"SavedModel is TensorFlow's: tl.export(tl.convert(m, 'keras'), path, "
                          f"format='saved_model') for a portable backbone.")
    try:
        import onnxscript  # noqa: F401  (the exporter's own dependency, named here to say so)
        import onnx  # noqa: F401
    except ImportError:
        raise BackendNotInstalledError(
            "ONNX export from torch needs onnx and onnxscript; received an environment without "
            'them. Install them with `pip install "tlbridge[export]"`.') from None
    names = [s.name for s in m.inputs]
    wrapper = _Serving(m.native, names, outputs).eval()
    dynamic = {}
    for s in m.inputs:
        axes = {0: torch.export.Dim.AUTO}
        axes.update({i + 1: torch.export.Dim.AUTO for i, d in enumerate(s.shape) if d is None})
        dynamic[s.name] = axes
    was_training = m.native.training
    m.native.eval()
    try:
        with contextlib.redirect_stdout(io.StringIO()):     # the exporter's step-by-step log
            torch.onnx.export(wrapper, _example(m), path, input_names=names,
                              output_names=[n for n, _, _ in outputs],
                              dynamic_shapes=(tuple(dynamic.values()),),
                              dynamo=True, external_data=False)
    finally:
        m.native.train(was_training)


def saved_model_runner(path: str):
    raise ExportError("Running a SavedModel needs the Keras backend (TensorFlow); received a "
                      "call on the torch backend. Install tlbridge[keras].")

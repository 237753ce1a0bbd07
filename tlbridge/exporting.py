"""tl.export: a model as a serving artifact (ONNX, TensorFlow SavedModel), checked when written.

An export nobody compared is a liability, so every export is run back (ONNX Runtime for ONNX,
TensorFlow for a SavedModel) on a seeded batch at two batch sizes and compared, output by
output, with the native model's logits; the worst difference is printed, stored in the
artifact's metadata, and an export over the float32 bar raises ExportError. The exported graph
takes the same float input as tl.logits (preprocessing is recorded in the metadata, not baked in)
and returns logits: one output "logits", or one per task for task heads. LoRA adapters are merged
into a copy first. The backend writes the graph (Export in backends/contract.py; backends/*/export.py); the check and
the metadata are written once, here.
"""
from __future__ import annotations

import json
import os


from . import api, multitask, parity
from .errors import ArgumentTypeError, BackendNotInstalledError, ExportError
from .kinds import Composite
from .model import TransferModel

FORMATS = ("onnx", "saved_model")
BAR = parity.TOL["float32"]         # max |exported - native| / max(max |native|, 1), per output
BATCHES = (1, 5)                    # two batch sizes: the batch axis really is dynamic
SIDECAR = "tlbridge_export.json"    # inside a SavedModel folder, beside saved_model.pb

__all__ = ["export", "FORMATS", "BAR", "read_metadata"]


def export(m: TransferModel, path, format: str = "onnx", *, extra: dict | None = None,
           verbose: bool = True) -> dict:
    """Write `m` to `path` as ONNX (torch: torch.onnx.export; Keras: tf2onnx) or a TensorFlow
    SavedModel (Keras), check it against the model and return the metadata written with it
    ({"check": {output: worst relative difference}, ...}). extra: more metadata (str -> JSON)."""
    m = _exportable(m)
    if format not in FORMATS:
        raise ArgumentTypeError(f"Expected format one of {list(FORMATS)}; received {format!r}.")
    path = os.fspath(path)
    outputs = _output_names(m)
    api._be(m.backend).export_model(m, path, format, outputs)
    check = _check(m, path, format, outputs)
    meta = _metadata(m, format, outputs, check, extra)
    _write_metadata(path, format, meta)
    if verbose:
        worst = max(check["worst"].values())
        print(f"exported {path} ({format}); checked against {m.backend} at batch sizes "
              f"{list(BATCHES)}: worst difference {worst:.1e} (bar {BAR:g})")
    return meta


def _exportable(m) -> TransferModel:
    """The model to write: a TransferModel with a head; with LoRA adapters, a merged copy."""
    if isinstance(m, Composite):
        raise ExportError("Expected a TransferModel for tl.export; received a fused model. Export "
                          "each member, or fine-tune one model on the members' outputs.")
    m = api._check_model(m)
    api._need_head(m, "tl.export")
    if m.spec.adapters:
        from .lora import merge_lora
        copy = api._rebuild(m.spec, m.backend, {**api.get_weights(m), **api.report_tensors(m)},
                            m.frozen, device=m.device)
        m = merge_lora(copy)
    return m


def _output_names(m: TransferModel) -> tuple:
    """((name, first column, last column + 1), ...): "logits" for one head, each task's name."""
    spec = api.loss_spec(m)
    if isinstance(spec, multitask.MultiLoss):
        return tuple((name, a, b) for name, (a, b) in spec.slices().items())
    return (("logits", 0, m.num_outputs),)


def _runner(path: str, format: str):
    """The exported artifact as a function: {input name: numpy} -> {output name: numpy}."""
    if format == "saved_model":
        from . import registry
        return registry.load("keras").saved_model_runner(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendNotInstalledError(
            "Checking an ONNX export needs onnxruntime; received an environment without it. "
            'Install it with `pip install "tlbridge[export]"`.') from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def _check(m: TransferModel, path: str, format: str, outputs: tuple) -> dict:
    """Run the artifact and the model on the same seeded batches; worst difference per output."""
    run = _runner(path, format)
    worst = {name: 0.0 for name, _, _ in outputs}
    for n in BATCHES:
        x, _ = parity.batch(m.inputs, n, m.num_outputs, seed=n, dtype=m.dtype)
        feed = x if isinstance(x, dict) else {m.inputs[0].name: x}
        z = api.logits(m, x)
        got = run(feed)
        for name, a, b in outputs:
            if name not in got:
                raise ExportError(f"Expected output {name!r} in the exported {format}; it has "
                                  f"{sorted(got)}.")
            worst[name] = max(worst[name], parity.rel_diff(z[:, a:b], got[name], floor=1.0))
    bad = {k: v for k, v in worst.items() if not v <= BAR}
    if bad:
        raise ExportError(f"Expected the exported {format} to give the model's logits within "
                          f"{BAR:g} (relative, per output); received differences {bad} at batch "
                          f"sizes {list(BATCHES)}. The file at {path!r} must not be served; "
                          f"report it with the backbone and framework versions.")
    return {"worst": worst, "batch_sizes": list(BATCHES), "bar": BAR,
            "measure": "max|exported - native| / max(max|native|, 1)"}


def _metadata(m: TransferModel, format: str, outputs: tuple, check: dict, extra) -> dict:
    pre = api.preprocessing_of(m)
    image = m.inputs[0].kind == "image"
    return {"format": "tlbridge-export/1", "artifact": format, "backbone": m.backbone_name,
            "backend": m.backend, "dtype": m.dtype,
            "inputs": [{"name": s.name, "shape": [None, *s.shape], "dtype": s.dtype}
                       for s in m.inputs],
            "layout": "NHWC" if image else "tokens",
            "outputs": [{"name": n, "columns": [a, b]} for n, a, b in outputs],
            "loss": api.loss_spec(m).name if not isinstance(api.loss_spec(m), multitask.MultiLoss)
            else "tasks",
            "preprocessing": pre.to_dict() if image else None,
            "check": check, **(extra or {})}


def _write_metadata(path: str, format: str, meta: dict) -> None:
    if format == "saved_model":
        with open(os.path.join(path, SIDECAR), "w") as f:
            json.dump(meta, f, indent=1)
        return
    import onnx
    model = onnx.load(path)
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"tlbridge.{key}", json.dumps(value)
    onnx.save(model, path)


def read_metadata(path) -> dict:
    """The metadata tl.export stored with an artifact (an .onnx file or a SavedModel folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        with open(os.path.join(path, SIDECAR)) as f:
            return json.load(f)
    import onnx
    props = onnx.load(path, load_external_data=False).metadata_props
    return {p.key[len("tlbridge."):]: json.loads(p.value) for p in props
            if p.key.startswith("tlbridge.")}


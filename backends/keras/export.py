"""tl.export on Keras (TensorFlow): a SavedModel through keras.export.ExportArchive, ONNX through
tf2onnx; the input as tl.logits takes it, any batch size, named logits out."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tlbridge.errors import ExportError


def _signature(m) -> list:
    dtype = tf.float64 if m.dtype == "float64" else tf.float32
    return [tf.TensorSpec((None, *s.shape), dtype if s.is_float else tf.int64, name=s.name)
            for s in m.inputs]


def _serving_fn(m, outputs: tuple, as_dict: bool):
    names = [s.name for s in m.inputs]
    model = m.native

    def serve(*args):
        x = args[0] if len(names) == 1 else dict(zip(names, args))
        z = model(x, training=False)
        parts = [tf.identity(z[:, a:b], name=n) for n, a, b in outputs]
        return {n: p for (n, _, _), p in zip(outputs, parts)} if as_dict else tuple(parts)
    return serve


def export_model(m, path: str, format: str, outputs: tuple) -> None:
    if format == "saved_model":
        import keras
        archive = keras.export.ExportArchive()
        archive.track(m.native)
        archive.add_endpoint("serve", _serving_fn(m, outputs, True), input_signature=_signature(m))
        archive.write_out(path, verbose=False)
        return
    try:
        import tf2onnx
    except ImportError:
        raise ExportError(
            "ONNX from a Keras model needs tf2onnx; received an environment without it. Install "
            'it (`pip install "tlbridge[export]"`), or take the torch route for a portable backbone: '
            "tl.export(tl.convert(m, 'torch'), path, format='onnx').") from None
    fn = tf.function(_serving_fn(m, outputs, False), input_signature=_signature(m), autograph=False)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=_signature(m))
    _rename_outputs(proto, [n for n, _, _ in outputs])
    import onnx
    onnx.save(proto, path)


def _rename_outputs(proto, names: list) -> None:
    """tf2onnx names graph outputs after TensorFlow tensors ("Identity:0"); ours are the tasks'."""
    for out, name in zip(proto.graph.output, names):
        old = out.name
        for node in proto.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        out.name = name


def saved_model_runner(path: str):
    loaded = tf.saved_model.load(path)
    fn = loaded.serve
    names = [s.name for s in fn.input_signature] if fn.input_signature else None

    def run(feed: dict, loaded=loaded) -> dict:     # the variables live as long as `run`
        args = [tf.constant(feed[n]) for n in names] if names else [tf.constant(v) for v in feed.values()]
        return {k: np.asarray(v) for k, v in fn(*args).items()}
    return run



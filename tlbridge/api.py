"""The public functions: validate in numpy, then hand the *how* to the model's backend."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace

import numpy as np

from . import (bert, checkpoints, config, devices, freezing, init, inputs, kinds, losses,
               packaged, registry, validation, weights as wio, zoo)
from .errors import (ArgumentTypeError, CheckpointError, DataError, NoHeadError, NotPortableError,
                     ShapeError, WeightsDownloadError, WeightsMismatchError)
from .kinds import Composite
from .model import TransferModel
from .specs import TORCHVISION, HeadSpec, ModelSpec, Preprocessing, freeze_options

FORMAT = "tlbridge.model/1"
_DTYPES = ("float32", "float64")
_FORMATS: dict = {}     # other file formats tl.load reads: format -> loader(path, tensors, meta, backend)


def register_format(name: str, loader) -> None:
    """A model kind built on the API (fusion) registers how tl.load reads its files."""
    _FORMATS[name] = loader


def _be(name: str):
    return registry.load(name)


def _check_model(m) -> TransferModel:
    if not isinstance(m, TransferModel):
        raise ArgumentTypeError(f"Expected a tlbridge TransferModel (from tl.load_backbone); "
                                f"received {type(m).__name__}. Build one with "
                                f"tl.load_backbone(...) or tl.load(path).")
    return m


def list_backbones(backend: str | None = None, portable: bool | None = None) -> list[str]:
    """Names `load_backbone` accepts on `backend`; portable=True keeps the ones that convert."""
    names = set(zoo.PORTABLE)
    if not portable:
        names |= set(_be(config.resolve(backend)).native_backbones())
    if portable is False:
        names -= set(zoo.PORTABLE)
    return sorted(names)


def load_backbone(name: str, *, weights=None, input_shape=None, backend: str | None = None,
                  dtype: str = "float32", seed: int | None = None, device: str = "cpu",
                  **options) -> TransferModel:
    """A pretrained (or seeded random) backbone, without a head.

    weights: None (random; for portable backbones the same weights on both backends for
    one seed), "imagenet", "pretrained" (weights installed with the package: minilm_l6's,
    mobilenet_v2's ImageNet file; no download), a checkpoint file (a torchvision state_dict
    .pth/.pt, a safetensors file, keras.applications VGG16 .h5 — see tlbridge.checkpoints),
    or, for the "bert" family, a BERT directory (config.json + model.safetensors).
    options: the backbone's builder options (e.g. seed_vgg's widths, batch_norm).
    device: "cpu" (the default), "auto" (the first GPU when there is one), "cuda", "cuda:N" or
    "mps"; `m.device` says where it is (tlbridge/devices.py).
    """
    be_name = config.resolve(backend)
    be = _be(be_name)
    device = be.resolve_device(devices.normalize(device))
    info = zoo.info(name, be.native_backbones(), be_name)
    shape = zoo.check_input_shape(name, input_shape)
    if dtype not in _DTYPES:
        raise DataError(f"Expected dtype one of {list(_DTYPES)}; received {dtype!r}.")
    if weights not in (None, "imagenet") and not isinstance(weights, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"Expected weights=None, 'imagenet' or a file path (str or os.PathLike); received "
            f"{type(weights).__name__} {weights!r}. To use a dict of arrays, load the backbone "
            f"with weights=None and call tl.set_weights(m, weights, strict=False).")
    opts = info.options(options) if info.portable else dict(options)
    weights, directory, opts = _pretrained(info, weights, opts, options)
    if input_shape is None and "max_position_embeddings" in opts:     # a small BERT: its table
        shape = (min(shape[0], int(opts["max_position_embeddings"])),)
    if info.portable:
        zoo.check_portable_input(name, opts, shape)
        if weights == "imagenet":
            zoo.check_pretrained(info)
    spec = ModelSpec(name, freeze_options(opts), shape, dtype, None,
                     None if info.portable else be_name)
    m = _build(spec, be_name, info.portable, weights, seed, init_weights=directory is None,
               device=device)
    if directory is not None:
        set_weights(m, bert.read_weights(directory, _be(be_name).canonical_shapes(m)))
    return m


def _pretrained(info, weights, opts: dict, given: dict):
    """weights="pretrained" (the packaged weights, no download) and BERT directories:
    (weights for _build, the BERT directory to read or None, the builder options)."""
    if info.family == "bert":
        if weights == "imagenet":
            raise CheckpointError(f"Expected weights=None, 'pretrained' or a BERT directory for "
                                  f"the text model {info.name!r}; received weights='imagenet'.")
        directory = bert.resolve(info.name, weights)
        if directory is None:
            return weights, None, opts
        source = bert.PACKAGED_TOKENIZER if weights == "pretrained" else str(directory)
        return None, directory, bert.options(directory, opts, given, source)
    if weights == "pretrained":
        return str(packaged.imagenet_file(info.name)), None, opts
    return weights, None, opts


def _build(spec: ModelSpec, be_name: str, portable: bool, weights, seed, init_weights: bool,
           device: str = "cpu"):
    """The headless backbone for `spec` (whose head, if any, the caller attaches), on
    `device` (already resolved by the backend)."""
    be = _be(be_name)
    # torchvision constructors load ImageNet weights themselves; the Keras mirrors take the
    # same torchvision checkpoint, translated (below)
    native_pretrained = weights == "imagenet" and (be_name == "torch" or not portable)
    with be.device_scope(device), _fetching(spec.backbone, be_name, native_pretrained):
        native, state = be.build_backbone(spec, portable, native_pretrained, seed)
    m = TransferModel(be_name, native, spec, portable, set(), state)
    be.place_built(m, device)
    if portable and weights is None and init_weights:
        shapes = be.canonical_shapes(m)
        start = init.bert_style if zoo.PORTABLE[spec.backbone].family == "bert" else init.torchvision_style
        be.set_weights(m, _cast(start(shapes, np.random.default_rng(seed)), spec.dtype))
    elif weights == "imagenet" and not native_pretrained:
        expected = be.canonical_shapes(m)
        with _fetching(spec.backbone, be_name, True):
            state = checkpoints.torchvision_imagenet(spec.backbone)
        set_weights(m, checkpoints.to_canonical(state, expected))
    elif weights not in (None, "imagenet"):
        tensors, pre = checkpoints.read(weights, spec.backbone, be.canonical_shapes(m))
        set_weights(m, tensors)
        if pre is not None:
            m.spec = replace(m.spec, preprocessing=pre)
    return m


@contextlib.contextmanager
def _fetching(backbone: str, backend: str, downloading: bool):
    """A failed download of pretrained weights, said as tlbridge says things: what could not be
    fetched, from where, and how to pass a local file instead (torchvision's and Keras's own
    errors are a bare URLError or "URL fetch failure")."""
    try:
        yield
    except Exception as exc:    # noqa: BLE001 - urllib, torch.hub and keras raise different types
        text = f"{type(exc).__name__}: {exc}"
        if not downloading or not _is_network_error(exc):
            raise
        where = ("torchvision's download server (torch.hub cache: $TORCH_HOME)"
                 if backend == "torch" or zoo.is_portable(backbone)
                 else "keras.applications' weight storage (cache: ~/.keras/models)")
        raise WeightsDownloadError(
            f"Expected to fetch the ImageNet weights of {backbone!r} from {where}; the download "
            f"failed ({text[:300]}). This machine may have no network. Pass a local file "
            f"instead: tl.load_backbone({backbone!r}, weights='path/to/checkpoint') (a "
            f"torchvision .pth, a safetensors file, or Keras VGG16 .h5; docs/checkpoints.md), "
            f"or copy the file into the cache above.") from exc


def _is_network_error(exc: BaseException) -> bool:
    import urllib.error
    seen = exc
    while seen is not None:
        if isinstance(seen, (urllib.error.URLError, ConnectionError, TimeoutError)) or \
                "URL fetch failure" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cast(w: dict, dtype: str) -> dict:
    return {k: np.asarray(v, dtype=dtype) for k, v in w.items()}


def _attach(m: TransferModel, head: HeadSpec, weights: dict | None) -> TransferModel:
    """A new model sharing m's backbone with `head`, whose weights start as `weights`
    (None: left as built, for a caller that sets every weight next)."""
    be = _be(m.backend)
    base = replace(m, spec=replace(m.spec, head=None))
    with be.device_scope(m.device):
        native, state = be.attach_head(base, head)
    new = TransferModel(m.backend, native, replace(m.spec, head=head), m.portable, set(m.frozen), state)
    be.place_built(new, m.device)
    if weights is not None:
        be.set_weights(new, _cast(weights, m.dtype))
    new.frozen = {n for n in m.frozen if n.startswith("backbone.")}
    be.apply_freeze(new)
    return new


def attach_head(m: TransferModel, head: HeadSpec, init) -> TransferModel:
    """For head kinds built on the API (multi-task heads): `init(feature_dim)` draws the new
    head's weights."""
    _check_model(m)
    return _attach(m, head, init(m.state["feature_dim"]))


def replace_head(m: TransferModel, num_outputs: int = 1, *, hidden=(), dropout: float = 0.0,
                 seed: int | None = None, loss: str = "bce",
                 label_smoothing: float = 0.0) -> TransferModel:
    """A new model sharing `m`'s backbone with a fresh head emitting logits.

    The head starts from torch.nn.Linear's default init drawn from numpy with `seed`, so
    the same seed gives the same head on both backends. `loss` ("bce": independent sigmoids,
    "ce": one softmax over the outputs, "mse": real values) is what fine_tune trains it with
    unless told otherwise, and decides what tl.predict returns.
    """
    _check_model(m)
    if not _is_int(num_outputs) or num_outputs < 1:
        raise ShapeError(f"Expected num_outputs as an int >= 1; received {num_outputs!r}. "
                         f"Pass the number of outputs (1 for binary classification).")
    if not 0.0 <= float(dropout) < 1.0:
        raise DataError(f"Expected 0 <= dropout < 1; received {dropout}.")
    head = HeadSpec(int(num_outputs), _check_hidden(hidden), float(dropout))
    spec = losses.of(head, loss, label_smoothing)
    head = replace(head, loss=spec.name, label_smoothing=spec.label_smoothing)
    return attach_head(m, head, linear_init(head, seed))


def linear_init(head: HeadSpec, seed):
    """torch.nn.Linear's default init of `head`'s layers, drawn from numpy with `seed` (the
    same head on both backends)."""
    return lambda feature_dim: init.linear_head(head.dims(feature_dim),
                                                np.random.default_rng(seed), head.layer_names())


def loss_spec(m: TransferModel, loss=None):
    """The loss a call trains or scores `m` with: its head's, or the call's `loss=` (a name,
    a tl.losses.Loss, or for a multi-task head tl.losses.TaskWeights)."""
    return losses.of(m.spec.head, loss)


def labels_for(m: TransferModel, y, n: int, spec, what: str = "labels y") -> np.ndarray:
    """Labels in the form the loss takes: (N, K) floats (multi-task: packed, NaN missing)."""
    return spec.labels(y, n, m.num_outputs, m.dtype, what)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_hidden(hidden) -> tuple:
    """Hidden layer widths: a sequence of ints >= 1 (empty: one Linear layer)."""
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise ArgumentTypeError(
            f"Expected hidden as a tuple of layer widths; received {type(hidden).__name__} "
            f"{hidden!r}. Write hidden=({hidden!r},) for one hidden layer, or hidden=() for none.")
    widths = tuple(hidden)
    bad = [h for h in widths if not _is_int(h) or h < 1]
    if bad:
        raise ShapeError(
            f"Expected hidden layer widths as ints >= 1; received hidden={hidden!r} "
            f"(bad: {bad}). A layer needs at least one unit: drop the entry, or use hidden=() "
            f"for a head that is a single Linear layer.")
    return tuple(int(h) for h in widths)


def _param_names(m) -> list[str]:
    return _be(m.backend).param_names(m)


def freeze(m: TransferModel, spec="backbone") -> TransferModel:
    """Frozen: no gradient, no update, BatchNorm on its running statistics (both backends)."""
    _check_model(m)
    m.frozen |= freezing.resolve(spec, _param_names(m))
    _be(m.backend).apply_freeze(m)
    return m


def unfreeze(m: TransferModel, spec="all") -> TransferModel:
    _check_model(m)
    m.frozen -= freezing.resolve(spec, _param_names(m))
    _be(m.backend).apply_freeze(m)
    return m


def trainable_names(m: TransferModel) -> list[str]:
    return [n for n in _param_names(m) if n not in m.frozen]


def features(m: TransferModel, x, *, batch_size: int = 64) -> np.ndarray:
    """(N, D): exactly what enters the head."""
    _check_model(m)
    x = validation.check_inputs(x, m.inputs, m.dtype)
    return _be(m.backend).features(m, x, batch_size)


def _need_head(m: TransferModel, what: str):
    if m.spec.head is None:
        raise NoHeadError(f"{what} needs a model with a head; received a bare backbone "
                          f"({m.backbone_name!r}, no head). Call m = tl.replace_head(m, "
                          f"num_outputs=...) first.")


def logits(m: TransferModel, x, *, batch_size: int = 64) -> np.ndarray:
    if isinstance(m, Composite):
        return m._logits(x, batch_size)
    _check_model(m)
    _need_head(m, "logits")
    x = validation.check_inputs(x, m.inputs, m.dtype)
    return _be(m.backend).logits(m, x, batch_size)


def predict(m: TransferModel, x, *, batch_size: int = 64) -> np.ndarray:
    """Probabilities, in numpy from the logits: sigmoid for a BCE head (and a fused model),
    softmax over the outputs for a CE head; an MSE head's values as they are."""
    z = logits(m, x, batch_size=batch_size)
    if isinstance(m, Composite):
        return m._probabilities(z)
    return loss_spec(m).probabilities(z)


def bce_loss_and_grads(m: TransferModel, x, y, training: bool = False):
    """Mean binary cross-entropy over all N*K entries, from logits, and its gradient with
    respect to every trainable parameter (canonical names and layout).

    training=True runs BatchNorm on batch statistics and updates its running statistics
    (frozen BatchNorm excepted), as one training step would.
    """
    return loss_and_grads(m, x, y, training=training, loss="bce")


def loss_and_grads(m: TransferModel, x, y, training: bool = False, *, loss=None):
    """The head's loss (or `loss=`: "bce", "ce", "mse", a tl.losses.Loss; tlbridge/losses.py)
    from logits, and its gradient with respect to every trainable parameter (canonical names
    and layout).

    Labels as for fine_tune: bce {0, 1} (N, K); ce class indices (N,) or rows summing to 1;
    mse real (N, K). training=True runs BatchNorm on batch statistics and updates its running
    statistics (frozen BatchNorm excepted), as one training step would. A multi-task head
    takes y as {task: labels} and loss=tl.losses.TaskWeights(...) (tlbridge/multitask.py).
    """
    _check_model(m)
    _need_head(m, "loss_and_grads")
    spec = loss_spec(m, loss)
    x = validation.check_inputs(x, m.inputs, m.dtype)
    y = labels_for(m, y, inputs.length(x), spec)
    return _be(m.backend).loss_and_grads(m, x, y, bool(training), spec)


def get_weights(m: TransferModel) -> dict[str, np.ndarray]:
    """Canonical names and layout (PyTorch state_dict conventions), as numpy copies."""
    _check_model(m)
    return _be(m.backend).get_weights(m)


def set_weights(m: TransferModel, weights: dict, *, strict: bool = True) -> TransferModel:
    """Validated in full before anything is written: a mismatch leaves `m` as it was.

    strict=False accepts a subset of the keys (say, backbone weights only); unexpected or
    mis-shaped keys are still errors.
    """
    _check_model(m)
    be = _be(m.backend)
    expected = be.canonical_shapes(m)
    if not strict and isinstance(weights, dict):
        expected = {k: v for k, v in expected.items() if k in weights}
    wio.check_layout(expected, weights)
    with np.errstate(over="ignore"):
        cast = _cast(weights, m.dtype)
    overflow = [k for k, v in cast.items() if not np.all(np.isfinite(v))]
    if overflow:  # finite as given, infinite in the model's dtype: checked before any write
        big = max(float(np.max(np.abs(np.asarray(weights[k], np.float64)))) for k in overflow)
        raise WeightsMismatchError(
            f"Expected weights representable in the model's dtype {m.dtype}; received values up "
            f"to {big:.3g} in [{', '.join(overflow[:8])}], which overflow to inf in {m.dtype}. "
            f"The model was left unchanged. Load the backbone with dtype='float64', or rescale "
            f"the weights.")
    be.set_weights(m, cast)
    return m


def convert(m: TransferModel, backend: str, *, device: str | None = None) -> TransferModel:
    """The same model (weights, head, freeze state) on the other framework (a FusedModel:
    every member), on `device` (default: the same device name as m's, which the other
    framework must have)."""
    if isinstance(m, Composite):
        return m._convert(backend)
    _check_model(m)
    kinds.of(m).check_rebuildable(m, "convert")
    target = config.validate(backend)
    if not m.portable:
        raise NotPortableError(
            f"{m.backbone_name!r} is a {m.backend}-native backbone and cannot be converted to "
            f"{target!r}. Expected a portable backbone: one of {sorted(zoo.PORTABLE)}.")
    where = _be(target).resolve_device(devices.normalize(device or m.device))
    return _rebuild(m.spec, target, {**get_weights(m), **report_tensors(m)}, set(m.frozen),
                    device=where)


def to_device(m: TransferModel, device: str) -> TransferModel:
    """Move m (in place) to "cpu", "cuda", "cuda:N", "mps" or "auto"; returns m. torch moves
    its parameters (and every later batch, anchor and optimizer state follows); Keras rebuilds
    its variables under tf.device there, with the same weights and freeze state."""
    _check_model(m)
    be = _be(m.backend)
    target = be.resolve_device(devices.normalize(device))
    if target != m.device and not be.to_device(m, target):     # the framework cannot move it:
        new = _rebuild(m.spec, m.backend, get_weights(m), set(m.frozen), device=target)
        m.native, m.state = new.native, new.state               # rebuilt there, same weights
    return m


def set_precision(*, tf32: bool) -> dict:
    """TF32 in float32 matmuls and convolutions on NVIDIA GPUs, on both frameworks: off for
    exact float32 (the parity helpers switch it off while they compare), on for speed. Returns
    the previous settings (tlbridge.devices.restore_precision)."""
    return devices.set_precision(tf32)


def _rebuild(spec: ModelSpec, backend: str, tensors: dict, frozen: set,
             device: str = "cpu") -> TransferModel:
    tensors = dict(tensors)
    rows = tensors.pop(REPORT_ROWS, None)
    new = _build(replace(spec, head=None), backend, spec.native_backend is None, None, None,
                 init_weights=False, device=device)
    if spec.head is not None:
        new = _attach(new, spec.head, None)     # every weight is set next
    set_weights(new, tensors)
    unknown = set(frozen) - set(_param_names(new))
    if unknown:
        raise CheckpointError(f"Frozen names not in the model: {sorted(unknown)[:5]}")
    if set(frozen) != new.frozen:
        new.frozen = set(frozen)
        _be(backend).apply_freeze(new)
    if rows is not None:
        new.report["trained_rows"] = np.asarray(rows, np.uint64)
    return new


REPORT_ROWS = "report/trained_rows"


def report_tensors(m: TransferModel) -> dict:
    """What a model file keeps of m.report beside the weights: the content hashes of the rows
    fine_tune trained it on (tl.fuse's own-training-data guard survives save/load/convert)."""
    rows = m.report.get("trained_rows")
    return {} if rows is None or not len(rows) else {REPORT_ROWS: np.asarray(rows, np.uint64)}


def save(m: TransferModel, path) -> None:
    """One safetensors file: canonical weights, plus the model spec as JSON in its metadata
    (a FusedModel: every member and the fusion weights, see tlbridge/fusion.py)."""
    if isinstance(m, Composite):
        return m._save(path)
    _check_model(m)
    kinds.of(m).check_rebuildable(m, "save")
    meta = {"format": FORMAT, "backend": m.backend, "spec": m.spec.to_json(),
            "frozen": json.dumps(sorted(m.frozen))}
    wio.save_file(path, {**get_weights(m), **report_tensors(m)}, meta)


def load(path, backend: str | None = None, *, device: str = "cpu") -> TransferModel:
    """Rebuild a saved model on `backend` (portable models load on either), on `device`."""
    tensors, meta = wio.load_file(path)
    if meta.get("format") in _FORMATS:
        return _FORMATS[meta["format"]](path, tensors, meta, backend)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"Expected a tlbridge model file (metadata format {FORMAT!r}); received {path!r} "
            f"with format {meta.get('format')!r}. For backbone weights alone use "
            f"tl.load_backbone(name, weights=path).")
    try:
        spec = ModelSpec.from_json(meta["spec"])
        frozen = set(json.loads(meta.get("frozen", "[]")))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"The model spec stored in {path!r} is damaged: {exc}") from exc
    target = config.resolve(backend if backend is not None else meta.get("backend"))
    if spec.native_backend is not None and spec.native_backend != target:
        raise NotPortableError(
            f"{path!r} holds the {spec.native_backend}-native backbone {spec.backbone!r}; it "
            f"cannot be loaded on {target!r}. Load it with backend={spec.native_backend!r}.")
    return _rebuild(spec, target, tensors, frozen,
                    device=_be(target).resolve_device(devices.normalize(device)))


def preprocessing_of(name_or_model) -> Preprocessing:
    """The input normalisation a backbone (or a model, whose weights may bring their own) expects."""
    if isinstance(name_or_model, TransferModel):
        if name_or_model.spec.preprocessing is not None:
            return name_or_model.spec.preprocessing
        name_or_model = name_or_model.backbone_name
    info = zoo.PORTABLE.get(name_or_model)
    return info.preprocessing if info is not None else TORCHVISION


def preprocess(name_or_model, images) -> np.ndarray:
    """uint8 RGB NHWC images -> the float32 input the backbone was trained on.

    In numpy, so both backends see the same bytes; the recipe comes from the backbone's
    catalog entry, or from the checkpoint the model was loaded from (Keras VGG16: BGR, caffe).
    """
    name = name_or_model.backbone_name if isinstance(name_or_model, TransferModel) else name_or_model
    if name in zoo.PORTABLE and zoo.PORTABLE[name].inputs == "tokens":
        raise ArgumentTypeError(f"Expected an image backbone for tl.preprocess; received the text "
                                f"model {name!r}, which takes token ids. Use tl.tokenize(m, texts).")
    pre = preprocessing_of(name_or_model)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ShapeError(f"Expected RGB images of shape (N, H, W, 3); received {images.shape}.")
    if images.dtype != np.uint8:
        raise DataError(f"Expected uint8 images (0-255); received dtype {images.dtype}. For float "
                        f"images in [0, 1] pass (images * 255).round().astype('uint8').")
    x = images.astype(np.float32)
    if pre.color == "BGR":
        x = x[..., ::-1]
    x = x * np.float32(pre.scale)
    return np.ascontiguousarray((x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32),
                                dtype=np.float32)

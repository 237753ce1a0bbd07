"""What each command does, in terms of the public tl.* API only (the CLI holds no library logic)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from . import inputs, recipe
from .usage import UsageError


def _tl(engine: str | None = None):
    if engine is not None:
        os.environ["KERAS_BACKEND"] = engine   # before Keras is first imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")     # TensorFlow's start-up chatter
    import tlbridge
    return tlbridge


def beside(model_path: str, suffix: str) -> str:
    """model.safetensors -> model<suffix>: where the history, loss curve and recipe go."""
    stem = model_path[:-len(".safetensors")] if model_path.endswith(".safetensors") else model_path
    return stem + suffix


def _classes(model_path: str) -> list | None:
    """The class names fine-tune stored beside a model (None for a model from elsewhere)."""
    try:
        with open(beside(model_path, ".recipe.json")) as f:
            return json.load(f).get("classes")
    except (OSError, ValueError):
        return None


def _load(tl, path: str, backend: str | None):
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} does not exist; expected a file written by "
                         f"`tlbridge fine-tune --out` or tl.save")
    return tl.load(path, backend=backend)


def backbones(args) -> int:
    tl = _tl()
    from tlbridge import zoo
    names = [args.backend] if args.backend else tl.available_backends()
    print(f"{'backbone':<22} {'kind':<9} {'inputs':<7} backends")
    rows: dict[str, list] = {}
    for be in names:
        for n in tl.list_backbones(be):
            rows.setdefault(n, []).append(be)
    for n, bes in sorted(rows.items(), key=lambda kv: (kv[0] not in zoo.PORTABLE, kv[0])):
        portable = n in zoo.PORTABLE
        kind = zoo.PORTABLE[n].inputs if portable else "image"
        print(f"{n:<22} {'portable' if portable else 'native':<9} {kind:<7} {', '.join(bes)}")
    return 0


def _optimizer(tl, r: dict):
    schedule = tl.optim.cosine() if r["schedule"] == "cosine" else None
    if r["warmup_steps"]:
        schedule = tl.optim.warmup(r["warmup_steps"], schedule)
    kinds = {"sgd": tl.optim.SGD, "adam": tl.optim.Adam, "adamw": tl.optim.AdamW}
    extra = {"momentum": r["momentum"]} if r["optimizer"] == "sgd" else {}
    return kinds[r["optimizer"]](r["lr"], weight_decay=r["weight_decay"], schedule=schedule, **extra)


def _model(tl, r: dict):
    """(model with its head, train set, val set, class names) from the recipe."""
    inputs.check_exists(r["data"], "data")
    if r["val_data"]:
        inputs.check_exists(r["val_data"], "val_data")
    shape = None if inputs.is_text(r["data"]) else (r["image_size"], r["image_size"], 3)
    base = tl.load_backbone(r["backbone"], weights=r["weights"], backend=r["backend"],
                            input_shape=shape, seed=r["seed"])
    train, classes = inputs.dataset(tl, base, r["data"], r, shuffle=True, augment=r["augment"])
    val = inputs.dataset(tl, base, r["val_data"], r, shuffle=False, classes=classes)[0] \
        if r["val_data"] else None
    k = len(classes)
    loss = r["loss"] if r["loss"] != "auto" else ("bce" if k == 2 else "ce")
    m = tl.replace_head(base, 1 if k == 2 else k, hidden=tuple(r["hidden"]), dropout=r["dropout"],
                        seed=r["seed"], loss=loss)
    if r["freeze"] != "none":
        tl.freeze(m, r["freeze"])
    return m, train, val, classes


def fine_tune(args) -> int:
    r = recipe.resolve(args)
    if args.print_config:
        print(recipe.dumps(r))
        return 0
    if r["resume"] and not r["checkpoint"]:
        raise UsageError("--resume continues from a checkpoint directory; give --checkpoint DIR too")
    tl = _tl(r["engine"])
    if r["engine"] is not None:
        r["backend"] = "keras"
    m, train, val, classes = _model(tl, r)
    r["backend"] = m.backend
    if m.backend == "keras":
        r["engine"] = tl.registry.keras_engine()    # the engine that ran, recorded in the recipe
    checkpoint = tl.Checkpoint(r["checkpoint"], resume=r["resume"]) if r["checkpoint"] else None
    history = tl.fine_tune(m, train, val=val, epochs=r["epochs"], batch_size=r["batch_size"],
                           optimizer=_optimizer(tl, r), unfreeze=r["unfreeze"] or None,
                           checkpoint=checkpoint, seed=r["seed"], progress=not args.no_progress)
    out = r["out"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tl.save(m, out)
    with open(beside(out, ".history.json"), "w") as f:
        f.write(history.to_json())
    history.plot(beside(out, ".loss.png"), title=f"{r['backbone']} on {r['backend']}")
    with open(beside(out, ".recipe.json"), "w") as f:
        f.write(recipe.dumps({**r, "classes": classes}))
    last = history.epochs[-1] if len(history) else {}
    print(f"wrote {out} ({r['backbone']}, {r['backend']}, {len(classes)} classes); last epoch: "
          + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float)))
    return 0


def evaluate(args) -> int:
    tl = _tl()
    m = _load(tl, args.model, args.backend)
    r = {"batch_size": args.batch_size, "text_column": args.text_column,
         "label_column": args.label_column}
    ds, _ = inputs.dataset(tl, m, args.data, r, shuffle=False, classes=_classes(args.model))
    scores = tl.evaluate(m, ds, batch_size=args.batch_size)
    print(json.dumps({k: round(float(v), 6) for k, v in scores.items()}))
    return 0


def predict(args) -> int:
    tl = _tl()
    m = _load(tl, args.model, args.backend)
    x, names = inputs.unlabelled(tl, m, args.data, args.text_column)
    p = tl.predict(m, x, batch_size=args.batch_size)
    classes = _classes(args.model)
    if classes and p.shape[1] == 1 and len(classes) == 2:
        header = [f"p_{classes[1]}"]
    elif classes and p.shape[1] == len(classes):
        header = [f"p_{c}" for c in classes]
    else:
        header = [f"p{i}" for i in range(p.shape[1])]
    import csv
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", *header])
        w.writerows([n, *(f"{v:.8g}" for v in row)] for n, row in zip(names, p))
    print(f"wrote {args.out} ({len(names)} samples, columns {header})")
    return 0


def convert(args) -> int:
    tl = _tl()
    if not os.path.exists(args.input):
        raise UsageError(f"input {args.input!r} does not exist; expected a torchvision .pth/.pt, "
                         f"a Keras .h5 or a tlbridge .safetensors file")
    if args.backbone is None:
        if not args.input.endswith(".safetensors"):
            raise UsageError(f"{args.input!r} is a checkpoint of weights alone; name its "
                             f"architecture with --backbone (see `tlbridge backbones`)")
        m = tl.load(args.input, backend=args.to)
    else:
        size = args.image_size
        m = tl.load_backbone(args.backbone, weights=args.input, backend=args.to,
                             input_shape=(size, size, 3))
    tl.save(m, args.output)
    print(f"wrote {args.output} ({m.backbone_name} on {m.backend})")
    return 0


def export(args) -> int:
    tl = _tl()
    m = _load(tl, args.model, args.backend)
    if args.backend is None and args.format == "saved_model" and m.backend != "keras":
        m = tl.convert(m, "keras")    # a SavedModel is TensorFlow's; portable models convert
    extra = {"classes": _classes(args.model), "source": os.path.basename(args.model)}
    tl.export(m, args.out, args.format, extra=extra)
    return 0


def parity(args) -> int:
    tl = _tl()
    from tlbridge import parity as par
    portable = tl.list_backbones(portable=True)
    if args.backbone not in portable:
        raise UsageError(f"parity compares a portable backbone; received {args.backbone!r}. "
                         f"Accepted: {portable}")
    cfg = par.config(args.backbone)
    s = par.suite(args.backbone, 3)
    mt, mk = s.models["torch", "float64"], s.models["keras", "float64"]
    print(f"{args.backbone}: torch vs Keras, float64, batch {cfg.batch64}, 3 outputs; "
          f"bar {par.TOL['float64']:g} per tensor")
    print("| mode | loss | worst gradient (tensor) | gradients | weights and BN stats |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for mode in ("eval", "train"):
        s.reset(frozen=False)
        x, y = par.batch(mt.inputs, cfg.batch64, 3, seed=par.SEED_BATCH)
        r = par.compare(mt, mk, x, y, training=mode == "train")
        worst = max(worst, r.loss, r.grads, r.stats)
        print(f"| {mode} | {r.loss:.1e} | {r.grads:.1e} (`{r.grads_at}`) | {r.n_grads} | {r.stats:.1e} |")
    return 0 if worst <= par.TOL["float64"] else 1


def speed(args) -> int:
    import tlbridge
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tlbridge.__file__))),
                          "benchmarks", "speed.py")
    if not os.path.isfile(script):
        raise RuntimeError("speed runs benchmarks/speed.py of a source checkout; this install has "
                           "none. Clone the repository and run `make speed` there.")
    return subprocess.run([sys.executable, script, *args.rest]).returncode

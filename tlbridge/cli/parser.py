"""The argument parser: one subparser per command, errors as one line and exit status 2."""
from __future__ import annotations

import argparse

from . import recipe
from .usage import Parser, UsageError, command as _cmd

__all__ = ["build_parser", "Parser", "UsageError"]


def _common(p) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _model_options(p) -> None:
    p.add_argument("--backend", choices=["torch", "keras"], help="framework to run the model on "
                   "(default: the one the file was saved from)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tlbridge", description="Transfer learning on PyTorch or Keras from the "
               "command line (docs/cli.md).")
    _common(p)
    sub = p.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    s = sub.add_parser("backbones", help="the catalog per backend")
    s.add_argument("--backend", choices=["torch", "keras"], help="one backend (default: each installed)")
    s.set_defaults(run=_cmd("backbones"))
    recipe.add_arguments(sub.add_parser("fine-tune", help="fine-tune a backbone on a folder "
                                        "of images or a CSV/JSONL of texts"))
    s = sub.add_parser("evaluate", help="loss and metrics of a model file on labelled data")
    s.add_argument("model")
    s.add_argument("data")
    _model_options(s)
    s.set_defaults(run=_cmd("evaluate"))
    s = sub.add_parser("predict", help="probabilities per sample, as CSV")
    s.add_argument("model")
    s.add_argument("data", help="an image folder (class sub-folders, or images directly), or a CSV/JSONL of texts")
    s.add_argument("--out", required=True, help="CSV to write")
    _model_options(s)
    s.set_defaults(run=_cmd("predict"))
    _convert_parser(sub)
    s = sub.add_parser("export", help="ONNX or SavedModel for serving, checked against the model")
    s.add_argument("model")
    s.add_argument("--format", choices=["onnx", "saved_model"], default="onnx")
    s.add_argument("--out", required=True, help="an .onnx file or a SavedModel folder")
    s.add_argument("--backend", choices=["torch", "keras"], help="the framework that writes it "
                   "(default: the file's own; a SavedModel from a torch file converts it to Keras)")
    s.set_defaults(run=_cmd("export"))
    s = sub.add_parser("parity", help="torch vs Keras in float64 on one backbone, per tensor")
    s.add_argument("backbone")
    s.set_defaults(run=_cmd("parity"))
    s = sub.add_parser("speed", help="the speed benchmark (benchmarks/speed.py of a clone)")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="its arguments (e.g. resnet18 --images 64)")
    s.set_defaults(run=_cmd("speed"))
    for s in sub.choices.values():
        _common(s)
    return p


def _convert_parser(sub) -> None:
    s = sub.add_parser("convert", help="a torchvision .pth, a Keras .h5 or a tlbridge file "
                       "-> a tlbridge file on another backend")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--to", required=True, choices=["torch", "keras"], dest="to")
    s.add_argument("--backbone", help="the architecture of a .pth/.h5 (not needed for a tlbridge file)")
    s.add_argument("--image-size", type=int, default=224)
    s.set_defaults(run=_cmd("convert"))

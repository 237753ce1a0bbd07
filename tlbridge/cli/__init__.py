"""The `tlbridge` command line: a thin layer over the public tl.* API (docs/cli.md).

Exit status: 0 success, 2 bad usage (an unknown flag, backbone or config key, a missing data
folder: anything the user can fix in the command), 1 failure. Errors print one line naming what
was wrong and what is accepted; `--debug` shows the traceback as well.
"""
from __future__ import annotations

import os
import sys
import traceback

from .parser import build_parser
from .usage import UsageError

USAGE_ERRORS = ("UnknownBackboneError", "UnknownBackendError", "BackendNotInstalledError",
                "DataError", "ArgumentTypeError", "ShapeError", "FreezeSpecError",
                "NotPortableError", "CheckpointError", "WeightsMismatchError",
                "NoPretrainedWeightsError", "NoHeadError", "AdapterError")

__all__ = ["main", "UsageError"]


def _exit_code(exc: BaseException) -> int:
    names = {k.__name__ for k in type(exc).__mro__}
    return 2 if isinstance(exc, UsageError) or names & set(USAGE_ERRORS) else 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    from .. import errors
    return text if isinstance(exc, (errors.TLBridgeError, UsageError)) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    debug = "--debug" in argv
    parser.command = next((a for a in argv if not a.startswith("-")), "")
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except BrokenPipeError:          # `tlbridge backbones | head`
        sys.stderr = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("tlbridge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (every error becomes one line and an exit status)
        if debug:
            traceback.print_exc()
        code = _exit_code(exc)
        hint = "" if debug else " (--debug shows the traceback)" if code == 1 else ""
        print(f"tlbridge: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return code

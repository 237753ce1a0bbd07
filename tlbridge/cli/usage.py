"""What every part of the command line shares: the usage error and the parser that reports
it in one line."""
from __future__ import annotations

import argparse
import importlib
import sys


class UsageError(Exception):
    """A command the user can fix: the message names what was wrong and what is accepted."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (not usage + message) and exits 2."""

    command = ""        # the subcommand named on the line, for the hint of a top-level error

    def error(self, message):
        prog = f"tlbridge {self.command}" if self.prog == "tlbridge" and self.command else self.prog
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def command(name: str):
    """The command's function, imported by its dotted name when it runs (so --help starts no
    framework, and this module stays below the commands it names)."""
    def run(args):
        return getattr(importlib.import_module("tlbridge.cli.commands"), name)(args)
    return run

"""Copy the latest generated tables (benchmarks/out/*.md) into README.md between markers.

    .venv/bin/python benchmarks/fill_readme.py
Each block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` in the README.
"""
from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(names):
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in names:
        body = (ROOT / "benchmarks" / "out" / f"{name}.md").read_text().rstrip("\n")
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README has no <!-- {name}:start --> block")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:] or ["parity"])

"""Where benchmark tables go: benchmarks/out/NAME.md, copied into the README by fill_readme.py."""
from __future__ import annotations

import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def write_table(name: str, lines: list[str]) -> str:
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

"""Copy the latest generated tables (benchmarks/out/NAME.md) into README.md and docs/*.md
between markers.

    make readme                                       # every block whose table exists
    .venv/bin/python benchmarks/fill_readme.py parity # just these blocks

Each block sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` in one or more pages
(README.md, docs/*.md; the parity table, say, in the README and in docs/parity.md), and the
command in BLOCKS writes its table (through benchmarks/_out.py's format: the table's lines,
written to benchmarks/out/NAME.md). Every page that holds a block gets it.
tests/test_claims.py checks that every block has both a writer and a page.
"""
from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"

# block -> (the file that writes benchmarks/out/NAME.md, the command to run it)
BLOCKS = {
    "training_parity": ("benchmarks/training_parity_table.py",
                        ".venv/bin/python benchmarks/training_parity_table.py"),
    "feature_cache": ("benchmarks/feature_cache.py", ".venv/bin/python benchmarks/feature_cache.py"),
    "data_throughput": ("benchmarks/data_throughput.py",
                        ".venv/bin/python benchmarks/data_throughput.py"),
    "parity": ("benchmarks/parity_table.py", "make parity"),
    "parity_summary": ("benchmarks/parity_table.py", "make parity"),
    "op_error": ("benchmarks/op_error.py", ".venv/bin/python benchmarks/op_error.py"),
    "speed": ("benchmarks/speed.py", "make speed"),
    "speed_summary": ("benchmarks/speed.py", "make speed"),
    "bf16_speed": ("benchmarks/bf16_speed.py", "make speed"),
    "bf16_summary": ("benchmarks/bf16_speed.py", "make speed"),
    "fusion": ("benchmarks/fusion.py", ".venv/bin/python benchmarks/fusion.py"),
    "few_shot": ("benchmarks/few_shot.py", ".venv/bin/python benchmarks/few_shot.py"),
    "data_parallel": ("benchmarks/data_parallel.py",
                      ".venv/bin/python benchmarks/data_parallel.py"),
    "text_transfer": ("benchmarks/text_transfer.py",
                      ".venv/bin/python benchmarks/text_transfer.py"),
    "demo": ("tlbridge/demo.py", "make demo"),
}


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)


def pages() -> list[pathlib.Path]:
    """The pages blocks may live in: README.md and every docs/*.md page."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def homes(name: str, texts: dict[pathlib.Path, str]) -> list[pathlib.Path]:
    """The pages that hold block `name`."""
    return [page for page, text in texts.items() if block_pattern(name).search(text)]


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        raise SystemExit(f"Unknown block(s) {unknown}. Expected some of {sorted(BLOCKS)}.")
    if not names:
        names = [n for n in BLOCKS if (OUT / f"{n}.md").exists()]
        for n in BLOCKS:
            if n not in names:
                print(f"skipped {n}: no benchmarks/out/{n}.md yet (run: {BLOCKS[n][1]})")
    texts = {page: page.read_text() for page in pages()}
    before = dict(texts)
    for name in names:
        table = OUT / f"{name}.md"
        if not table.exists():
            raise SystemExit(f"No {table.relative_to(ROOT)}. Run: {BLOCKS[name][1]}")
        body = table.read_text().rstrip("\n")
        where = homes(name, texts)
        if not where:
            raise SystemExit(f"No page has a <!-- {name}:start --> ... <!-- {name}:end --> block; "
                             f"expected one in README.md or docs/*.md. Add the markers where the "
                             f"table belongs.")
        for page in where:
            texts[page] = block_pattern(name).sub(lambda m: m.group(1) + body + "\n" + m.group(2),
                                                  texts[page])
        print(f"filled {name} in " + ", ".join(str(p.relative_to(ROOT)) for p in where))
    for page, text in texts.items():
        if text != before[page]:
            page.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])

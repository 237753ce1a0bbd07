"""What the README and the docs pages claim about the project itself: every file they name is
in the project, every generated block has a script that writes it and a page it lives in, every
link between the pages resolves, the README stays a front door, the examples call fine_tune
in its v3 form, and the Keras backend keeps TensorFlow's start-up log lines off the user's
console."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import BACKENDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "build", "node_modules", "__pycache__", ".pytest_cache"}
TOP_DIRS = ("tlbridge", "backends", "benchmarks", "tests", "docs", ".ci")


def _fill_readme():
    spec = importlib.util.spec_from_file_location("fill_readme", ROOT / "benchmarks" / "fill_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project_files() -> list[pathlib.Path]:
    """The project's .py and .md files: git's list, or the tree without venvs and builds."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md")
                 and not SKIP_DIRS & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]
    return [p for p in files if p.is_file()]


def _generated() -> set[str]:
    """Files the benchmarks write (benchmarks/out/ is not in the repository)."""
    return {f"{name}.md" for name in _fill_readme().BLOCKS}


def test_nothing_points_outside_the_project():
    outside = ".." + "/shared"
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _project_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside in line]
    assert not hits, f"references to {outside!r} (outside the project): {hits}"


def _missing(pattern: re.Pattern, accept) -> list[str]:
    names = {p.name for p in _project_files()}
    missing = []
    for path in _project_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in pattern.finditer(line):
                token = m.group(1).rstrip("./")
                if "//" in token or any(c in token for c in "*{}<>") or accept(token):
                    continue
                if (ROOT / token).exists() or (path.parent / token).exists():
                    continue
                if "/" not in token and token in names:
                    continue
                missing.append(f"{path.relative_to(ROOT)}:{i}: {token}")
    return missing


def test_every_markdown_file_named_exists():
    generated = _generated()
    missing = _missing(re.compile(r"(?<![\w./{}-])([\w./-]*\w\.md)\b"),
                       lambda t: t.startswith("benchmarks/out/") or pathlib.PurePath(t).name in generated)
    assert not missing, "named .md files that are not in the project:\n" + "\n".join(missing)


def test_every_project_path_named_exists():
    pattern = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(d) for d in TOP_DIRS)
                         + r")/[\w./*{}<>-]*)")
    missing = _missing(pattern, lambda t: t.startswith("benchmarks/out"))
    assert not missing, "named paths that are not in the project:\n" + "\n".join(missing)


def _pages() -> list[pathlib.Path]:
    """README.md and every docs/*.md page: what the claims below are checked on."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_fill_readme_fills_every_page():
    assert set(_fill_readme().pages()) == set(_pages())


def test_every_block_fill_readme_fills_has_markers_and_a_producer():
    fill = _fill_readme()
    homes = {}
    for page in _pages():
        text = page.read_text()
        rel = page.relative_to(ROOT)
        marked = set(re.findall(r"<!-- (\w+):(?:start|end) -->", text))
        assert marked <= set(fill.BLOCKS), (
            f"{rel}: blocks {sorted(marked - set(fill.BLOCKS))} are not in fill_readme.BLOCKS")
        for name in marked:
            assert text.count(f"<!-- {name}:start -->") == 1 == text.count(f"<!-- {name}:end -->"), \
                f"{rel}: block {name} needs one start and one end marker"
            assert fill.block_pattern(name).search(text), f"{rel}: {name}: end marker before start marker"
            homes.setdefault(name, []).append(rel)
    assert set(homes) == set(fill.BLOCKS), (
        f"blocks no page holds: {sorted(set(fill.BLOCKS) - set(homes))} (README.md or docs/*.md)")
    for name, (producer, command) in fill.BLOCKS.items():
        source = (ROOT / producer).read_text()
        writes = re.search(rf"write_table\(\s*[\"']{name}[\"']", source) or f'"{name}.md"' in source
        assert writes, f"{producer} does not write benchmarks/out/{name}.md"
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), command
        else:
            assert (ROOT / command.split()[-1]).exists(), command


def test_readme_is_a_front_door_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move reference into docs/"


def _prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((i, line))
    return out


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen, anchors = {}, set()
    for _, line in _prose(page.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: pathlib.Path) -> list[tuple[int, str]]:
    return [(i, m.group(1)) for i, line in _prose(page.read_text())
            for m in re.finditer(r"\]\(([^)\s]+)\)", line)]


def test_every_link_in_the_readme_and_docs_resolves_inside_the_project():
    bad = []
    for page in _pages():
        for i, target in _links(page):
            if re.match(r"[a-z]+:", target):
                continue                                   # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{i}: {target}"
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{where} (no such file in the project)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not bad, "links that do not resolve:\n" + "\n".join(bad)


def test_the_readme_links_every_docs_page():
    linked = {target.partition("#")[0] for _, target in _links(ROOT / "README.md")}
    linked = {path for path in linked if path.startswith("docs/")}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert not linked - pages, f"README links docs pages that do not exist: {sorted(linked - pages)}"
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


# fine_tune's v3 parameters (tlbridge's API v3: optimizers, checkpoint, loss and parallel as values)
FINE_TUNE_V3 = {"val", "epochs", "batch_size", "optimizer", "unfreeze", "loss", "early_stopping",
                "checkpoint", "seed", "progress", "callbacks", "feature_cache", "precision", "parallel",
                "compile"}


def _call_arguments(text: str, start: int) -> str | None:
    """The text between the parenthesis at `start` and its match (None when unbalanced)."""
    depth = 0
    for j in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[start + 1:j]
    return None


def test_examples_call_fine_tune_with_its_v3_keywords():
    old = []
    for page in _pages():
        text = page.read_text()
        for m in re.finditer(r"\bfine_tune\(", text):
            args = _call_arguments(text, m.end() - 1)
            if args is None:
                continue
            flat, depth = [], 0
            for c in args:                                  # keep only the call's own level
                depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(c, 0)
                flat.append(c if depth == 0 or c in "([{" else " ")
            for kw in re.findall(r"(?<![\w.])(\w+)\s*=(?!=)", "".join(flat)):
                if kw not in FINE_TUNE_V3:
                    line = text.count("\n", 0, m.start()) + 1
                    old.append(f"{page.relative_to(ROOT)}:{line}: {kw}=")
    assert not old, ("fine_tune keywords that moved in v3 (docs/fine-tuning.md: Moved in v3):\n"
                     + "\n".join(old))


# ---- TensorFlow's start-up logs --------------------------------------------------------------

PREDICT = """
import os, numpy as np, tlbridge as tl
m = tl.load_backbone("seed_vgg", backend="keras", input_shape=(16, 16, 3), widths=(4,), seed=0)
m = tl.replace_head(m, 1, seed=0)
print("shape", tl.predict(m, np.zeros((1, 16, 16, 3), "float32")).shape)
print("level", os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
try:    # TensorFlow turns oneDNN on only on some x86 CPUs (not on this AVX2-only EPYC)
    from tensorflow.python.util import _pywrap_util_port
    print("onednn", _pywrap_util_port.IsMklEnabled())
except ImportError:
    print("onednn unknown")
"""
TF_NOISE = re.compile(r"onednn|cuinit|cuda|absl::InitializeLog|cpu_feature_guard", re.I)
needs_keras = pytest.mark.skipif("keras" not in BACKENDS, reason="needs keras")


def _predict(level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    out = subprocess.run([sys.executable, "-c", PREDICT], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


@needs_keras
def test_keras_backend_keeps_tensorflow_startup_logs_off_the_console():
    out = _predict(None)
    noise = [line for line in out.stderr.splitlines() if TF_NOISE.search(line)]
    assert not noise, "TensorFlow log lines on stderr:\n" + "\n".join(noise)
    assert "shape (1, 1)" in out.stdout and "level 3" in out.stdout


@needs_keras
def test_a_tf_log_level_the_user_set_is_kept():
    out = _predict("0")
    assert "level 0" in out.stdout
    if "onednn True" in out.stdout:
        # TensorFlow logs the oneDNN notice at start-up when it turns oneDNN on; level 0 asks
        # for every line
        assert "oneDNN custom operations" in out.stderr


@needs_keras
def test_startup_log_filter_applies_tensorflows_levels():
    from tlbridge.backends.keras import _drop_below

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            "To enable the following instructions: AVX2, rebuild TensorFlow.\n"
            "W0000 00:00:1.0 1 x.cc:1] a warning\n"
            "E0000 00:00:1.0 1 y.cc:2] an error\n")
    lines = text.splitlines(keepends=True)
    assert _drop_below(text, 0) == text
    assert _drop_below(text, 1) == "".join([lines[0]] + lines[4:])   # the notice goes with a record shown
    assert _drop_below(text, 2) == "".join([lines[0], lines[5]])
    assert _drop_below(text, 3) == ""
    assert _drop_below("plain output\n", 3) == "plain output\n"


def test_every_test_the_docs_cite_exists():
    """README.md and docs/*.md name tests as proof: each named test function must exist."""
    defined = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        for name in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.M):
            defined.setdefault(name, set()).add(path.name)
    missing = []
    for doc in _pages():
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            for m in re.finditer(r"(?:(test_\w+)\.py::)?\b(test_\w+)\b(?!\.py)", line):
                file, name = m.group(1), m.group(2)
                if name not in defined or (file and f"{file}.py" not in defined[name]):
                    missing.append(f"{doc.relative_to(ROOT)}:{i}: {m.group(0)}")
    assert not missing, "tests cited that do not exist:\n" + "\n".join(missing)

"""benchmarks/speed.py runs end to end and refuses to report speeds for runners that computed
different things. Nothing here asserts a time (speed claims live in benchmarks/ only)."""
from __future__ import annotations

import json
import pathlib
import sys

import pytest
from helpers import BACKENDS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import speed  # noqa: E402


def _result(backend, raw, ours):
    return {"backend": backend, "check": {"raw": {"losses": raw}, "tl": {"losses": ours}}}


def test_losses_that_agree_are_reported_with_their_largest_difference():
    rs = [_result("torch", [0.7, 0.6], [0.7, 0.6]),
          _result("keras", [0.7, 0.6 * (1 + 3e-10)], [0.7, 0.6])]
    assert speed.check_losses(rs) == pytest.approx(3e-10, rel=1e-3)


def test_losses_that_differ_stop_the_benchmark_with_the_figures():
    rs = [_result("torch", [0.7, 0.6], [0.7, 0.6]), _result("keras", [0.7, 0.61], [0.7, 0.6])]
    with pytest.raises(SystemExit, match=r"differ by 1\.67e-02 relative \(keras raw\)"):
        speed.check_losses(rs)
    rs = [_result("torch", [0.7], [0.7]), _result("keras", [0.7], [0.7 * (1 + 1e-8)])]
    with pytest.raises(SystemExit, match="keras tl"):
        speed.check_losses(rs)


def test_speed_benchmark_runs_end_to_end(tmp_path):
    speed.main(["seed_vgg", "--image-size", "16", "--batch-size", "8", "--images", "24",
                "--repeats", "2", "--out", str(tmp_path)])
    table = (tmp_path / "speed.md").read_text()
    for backend in BACKENDS:
        assert f"| seed_vgg | {backend} " in table
    data = json.loads((tmp_path / "speed.json").read_text())
    assert len(data["results"]) == len(BACKENDS)
    assert data["loss_agreement"]["seed_vgg"]["float64"] <= speed.TOLERANCE
    for r in data["results"]:
        assert len(r["train"]["tl"]["seconds"]) == 2 and len(r["train"]["tl"]["losses"]) == 3
        assert len(r["check"]["raw"]["losses"]) == 2
        assert all(r["train"][k]["memory"]["rss"] >= 0 for k in ("raw", "tl"))
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_unknown_backbone_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="Unknown portable backbone"):
        speed.main(["resnet5O", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())

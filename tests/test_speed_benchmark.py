"""benchmarks/speed.py runs end to end and refuses to report speeds for runners that computed
different things. Nothing here asserts a time (speed claims live in benchmarks/ only)."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
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


def test_text_backbones_without_a_packaged_tokenizer_are_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"minilm_l6") as err:
        speed.main(["token_bag", "--out", str(tmp_path)])
    assert "Unknown portable backbone(s) ['token_bag']" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_benchmark_texts_are_english_of_the_stated_lengths_and_seeded():
    import _texts

    texts, labels = _texts.texts(200, seed=3)
    words = [len(t.split()) for t in texts]
    assert min(words) >= _texts.SHORTEST and max(words) <= _texts.LONGEST
    assert max(words) - min(words) > 30                      # varied lengths, not one
    assert all(_texts.WORD.fullmatch(w) for t in texts for w in t.split())
    assert set(np.unique(labels)) == {0.0, 1.0}
    again, _ = _texts.texts(200, seed=3)
    assert again == texts and _texts.texts(200, seed=4)[0] != texts


def test_text_rows_state_their_data_and_options_in_the_table():
    args = argparse.Namespace(
        backbones=["minilm_l6"], image_size=64, batch_size=32, images=256, texts=128, repeats=7,
        text_repeats=2, dtype="float32", backends=None)
    rec = {"img_s": 10.0, "iqr": [9.0, 11.0], "seconds": [1.0, 1.1], "first": 3.0}
    r = {"backend": "torch", "backbone": "minilm_l6", "device": "cpu", "threads": "t",
         "tf32": "n/a", "versions": {}, "train": {"raw": rec, "tl": rec},
         "infer": {k: rec for k in ("raw features", "tl features", "raw logits", "tl logits")},
         "data": {"tokens": [10, 44.0, 83], "batch_lengths": [72, 83], "real_share": 0.57}}
    lines = speed.table([r], args, {"minilm_l6": {"float64": 0.0, "drift": 1e-8}})
    assert "over 2 epochs" in lines[0] and "128 texts of 8–60 words" in lines[0]
    assert "10–83 tokens" in lines[0] and "(72–83 tokens; 57%" in lines[0]
    assert "img/s" not in lines[0]                           # no image row, no image clause
    assert lines[-1].endswith("minilm_l6 --texts 128 --text-repeats 2`")

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
    import tlbridge as tl
    engines = speed.chosen_engines(tl, speed._arguments(["seed_vgg"]))   # Keras: TF and JAX
    table = (tmp_path / "speed.md").read_text()
    for engine in engines:
        assert f"| seed_vgg | {speed.LABEL[engine]} (cpu) | tl.fine_tune |" in table
    assert "| seed_vgg |" in (tmp_path / "speed_summary.md").read_text()
    data = json.loads((tmp_path / "speed.json").read_text())
    assert [r["engine"] for r in data["results"]] == engines
    assert data["flops"]["peak"]["flop_s"] > 0 and data["flops"]["flops"]["seed_vgg"]["train"] > 0
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


# -- every engine, the user's pick, FLOP/s ------------------------------------------------
def _rec(img_s, seconds):
    return {"img_s": img_s, "iqr": [img_s, img_s], "seconds": seconds, "first": 1.0}


def _engine_result(engine, backend, runners):
    return {"backend": backend, "engine": engine, "backbone": "resnet50", "device": "cpu",
            "threads": "t", "tf32": "n/a", "versions": {},
            "train": {k: _rec(*v) for k, v in runners.items()}}


FLOPS = {"peak": {"flop_s": 200e9, "size": 4096, "threads": 2, "repeats": 5},
         "flops": {"resnet50": {"forward": 0.667e9, "train": 2.0e9}}}


def test_keras_rows_are_judged_against_keras_applications_and_the_same_model():
    r = _engine_result("jax", "keras", {"app": (40.0, [1.0, 2.0]), "raw": (30.0, [1.5, 2.0]),
                                        "tl": (20.0, [2.0, 3.0])})
    rows = speed.train_rows([r], FLOPS)[2:]
    assert [row.split(" | ")[2] for row in rows] == [
        "keras.applications.ResNet50, keras.fit †", "keras.fit, tlbridge's model", "tl.fine_tune"]
    tl_row = rows[2].split(" | ")
    assert tl_row[4].startswith("1.75 (1.62–1.88) **over**")      # ÷ keras.applications, per epoch
    assert tl_row[5].startswith("1.42 (1.38–1.46)")               # ÷ keras.fit on the same model
    assert tl_row[6] == "0.20"                                     # 20 img/s × 2 GFLOP ÷ 200 GFLOP/s
    assert rows[0].split(" | ")[4] == "—"


def test_torch_rows_are_judged_against_the_torch_loop_and_summarised_per_engine():
    t = _engine_result("torch", "torch", {"raw": (50.0, [1.0, 1.0]), "tl": (49.0, [1.02, 1.02]),
                                          "tlc": (25.0, [2.0, 2.0])})
    k = _engine_result("tensorflow", "keras", {"app": (40.0, [1.0, 1.0]), "raw": (30.0, [1.0, 1.0]),
                                               "tl": (60.0, [0.5, 0.5])})
    rows = speed.train_rows([t], FLOPS)[2:]
    assert "tl.compile (torch.compile)" in rows[2] and "2.00 (2.00–2.00) **over**" in rows[2]
    args = speed._arguments(["resnet50"])
    line = speed.summary([t, k], args, FLOPS)[-1]
    assert line == ("| resnet50 | 49 / 50 (1.02×) | 60 / 40 (0.50×) | "
                    "60 (Keras on TF) / 50 (torch) | 0.60 |")


def test_keras_applications_losses_are_left_out_of_the_same_computation_check():
    r = _engine_result("tensorflow", "keras", {})
    r["check"] = {"raw": {"losses": [0.7]}, "tl": {"losses": [0.7]}, "app": {"losses": [0.9]}}
    assert speed.loss_difference([r]) == (0.0, "")


def test_training_flops_are_counted_from_the_model_not_written_down():
    import _flops
    f = _flops.training_flops("resnet18", 224)
    # torchvision's resnet18: 1.814 G multiply-adds at 224x224 (its weights' _ops), 2 FLOPs each
    assert f["forward"] == pytest.approx(2 * 1.814e9, rel=0.01)
    assert f["train"] == 3 * f["forward"] and f["image_size"] == 224


def test_matmul_peak_is_the_best_of_its_repeats():
    import _flops
    pk = _flops.matmul_peak(size=256, repeats=3)
    assert pk["flop_s"] == pytest.approx(2 * 256 ** 3 / pk["seconds"])
    assert pk["flop_s"] > 1e8 and pk["threads"] >= 1


@pytest.mark.skipif("keras" not in BACKENDS, reason="needs keras")
def test_the_keras_users_pick_is_keras_applications_own_model_with_a_one_logit_head():
    import keras

    import tlbridge.registry as registry
    registry.load("keras")
    km = speed._app_model(keras, "mobilenet_v2", 32, "float32")
    own = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3),
                                         pooling="avg")
    assert km.count_params() == own.count_params() + 1280 + 1           # + Dense(1)
    assert km.output.shape == (None, 1) and km.input.shape == (None, 32, 32, 3)
    assert isinstance(km.loss, keras.losses.BinaryCrossentropy) and km.loss.from_logits
    assert float(km.optimizer.momentum) == speed.MOMENTUM

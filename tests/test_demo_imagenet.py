"""The ImageNet step of `make demo` (tlbridge/demo_imagenet.py), on a tiny subset of its task."""
from __future__ import annotations

import inspect
import json

import tlbridge as tl
from tlbridge import demo, demo_imagenet

# head only: an unfrozen epoch would compile Keras's full training step (~15 s); the demo does that
TINY = dict(epochs=1, batch_size=10, optimizer=tl.optim.Adam(1e-3), unfreeze={0: "head"}, seed=0,
            progress=False)


def test_imagenet_step_fine_tunes_the_genuine_checkpoint_beside_random_init(backend, tmp_path):
    """Both inits go through the same call; the pretrained one really starts from the packaged
    ImageNet file (its frozen features are alive, the random init's vanish), hash named."""
    lines = []
    r = demo_imagenet.run(tl, str(tmp_path), lines.append, size=32, per_class=2, val_size=20,
                          backends=(backend,), recipe=TINY)
    assert "mobilenet_v2-b0353104.pth" in "\n".join(lines)
    assert r["sha256"].startswith("b0353104") and (r["train"], r["val"]) == (20, 20)
    runs = r["runs"][backend]
    assert runs["imagenet"]["feature_scale"] > 1e-2 and runs["random"]["feature_scale"] < 1e-6
    for init in demo_imagenet.INITS:
        assert runs[init]["cached"] == [True]                 # the head on cached features
        assert 0.0 <= runs[init]["val_head_only"] == runs[init]["val_final"] <= 1.0
    assert json.loads((tmp_path / "demo_imagenet.json").read_text())["runs"][backend]["imagenet"]


def test_make_demo_runs_the_imagenet_step():
    assert "demo_imagenet.run(tl, out_dir, say)" in inspect.getsource(demo.main)

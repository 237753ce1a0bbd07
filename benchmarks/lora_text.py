"""LoRA vs full fine-tuning on real text (docs/lora.md): benchmarks/text_transfer.py's task and
protocol (fortunes by topic, minilm_l6, linear probe on cached features, then two epochs of
AdamW with a cosine schedule on tl.data.texts), with the fine-tune replaced by LoRA r=8 (alpha
16) on every Linear of the encoder plus the head, at the full fine-tune's learning rate and at
10x it (LoRA's usual range). Both rates are reported on the test split; neither was chosen on it.

    .venv/bin/python benchmarks/lora_text.py [backend] [max_per_class] [epochs]
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import text_transfer as tt  # noqa: E402
from tlbridge import demo_text_data as corpus, optim  # noqa: E402

RATES = (tt.LR, 10 * tt.LR)


def main(backend: str = "keras", max_per_class: str = "150", epochs: str = "2") -> None:
    import tlbridge as tl
    texts, y, names = corpus.load_corpus(max_per_class=int(max_per_class), seed=0)
    train, test = corpus.stratified_split(y, test_fraction=1 / 3, seed=0)
    test_texts = [texts[i] for i in test]
    m = tl.load_backbone(tt.BACKBONE, weights="pretrained", backend=backend)
    f = tt.by_length(tl, m, [texts[i] for i in train], lambda mm, b: tl.features(mm, b))
    lines = [f"fortunes by topic, {tt.BACKBONE}, {backend}, {len(train)} training / {len(test)} "
             f"test texts, {epochs} epochs from the linear probe", "",
             "| fine-tune | lr | trainable parameters | test accuracy | seconds |", "|---|---|---|---|---|"]
    probe = tt.probe_model(tl, m, f, y[train], len(names))
    lines.append(f"| none (the linear probe) | - | - | {tt.accuracy_of(tl, probe, test_texts, y[test]):.3f} | - |")
    print(lines[-1], flush=True)
    for lr in RATES:
        model = tl.add_lora(tt.probe_model(tl, m, f, y[train], len(names)), rank=8, alpha=16, seed=0)
        ds = tl.data.texts([texts[i] for i in train], y[train], model=model,
                           max_length=tt.MAX_LENGTH, shuffle=True, **tt.FINE_TUNE)
        t0 = time.perf_counter()
        tl.fine_tune(model, ds, epochs=int(epochs), progress=False,
                     optimizer=optim.AdamW(lr, schedule=optim.cosine()))
        seconds = time.perf_counter() - t0
        n = sum(int(np.prod(v.shape)) for k, v in tl.get_weights(model).items()
                if k in set(tl.trainable_names(model)))
        acc = tt.accuracy_of(tl, model, test_texts, y[test])
        lines.append(f"| LoRA r=8 | {lr:.0e} | {n:,} | {acc:.3f} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""benchmarks/gpu_check.py is what the first lent GPU machine runs (issue 23); here it must run
on the CPU, report every GPU part as skipped at once, and write its results folder."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from helpers import BACKENDS

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif("torch" not in BACKENDS, reason="the script starts with torch")
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_results(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself")
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # a shared, loaded 2-core machine can take a minute to import torch: room for that here
    module.PARTS = {k: (*v[:3], 300) for k, v in module.PARTS.items()}
    assert module.main(["--out", str(tmp_path), "--budget", "900"]) == 0
    results = json.loads((tmp_path / "results").with_suffix(".json").read_text())
    assert list(results) == list(module.PARTS)
    for name, (_, needs_cuda, _, _) in module.PARTS.items():
        if needs_cuda:
            assert results[name]["status"] == "skipped: no CUDA"
            assert results[name]["seconds"] < 0.5
    assert results["env"]["status"] == "reported"
    assert results["env"]["figures"]["torch"] == torch.__version__
    assert results["tf32_roundtrip"]["status"] == "ok"
    table = (tmp_path / "results").with_suffix(".md").read_text()
    assert "| tf32_roundtrip | ok |" in table and "| nccl_one_rank | skipped: no CUDA |" in table

"""benchmarks/fp8.py's shapes, tables and target lines, with its timer replaced by made-up figures (this checks
the script's bookkeeping on CPU, not any speed), and its refusal to time FP8 without a GPU."""
import importlib.util
import os
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fp8.py")


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("fp8_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_shapes_of_the_presets(bench):
    shapes = bench.load_presets()
    assert shapes["GPT-1.3B"] == {"qkv": (2048, 6144), "proj": (2048, 2048), "fc1": (2048, 8192), "fc2": (8192, 2048)}
    # GQA: 32 query heads + 2 x 8 key/value groups of 128; SwiGLU stacks gate and up
    assert shapes["LLaMA-7B"] == {"qkv": (4096, 6144), "proj": (4096, 4096), "fc1": (4096, 22016),
                                  "fc2": (11008, 4096)}


def test_gpu_run_writes_tables_and_targets(bench, tmp_path, monkeypatch):
    import megaengine.fp8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU 80GB")
    monkeypatch.setattr(megaengine.fp8, "check_fp8_run", lambda *a, **k: None)
    speed = {"bf16": 1.0, "fp8-tensorwise": 0.7, "fp8-rowwise": 0.8, "fp8-delayed": 0.65}
    monkeypatch.setattr(bench, "time_linear", lambda name, tokens, k, n, device: speed[name] * k * n / 2 ** 24)
    runs = []

    def train_run(argv, workdir):  # logged windows: the first (start-up) slow, FP8 1.2x faster, loss +1%
        runs.append(argv)
        fp8 = "--fp8-format" in argv
        tps, loss = 1.2e4 * (1.2 if fp8 else 1.0), 5.0 * (1.01 if fp8 else 1.0)
        return [{"tokens_per_s": 10.0, "loss": 9.0}] + [{"tokens_per_s": tps * f, "loss": loss} for f in (0.9, 1, 1.1)]
    monkeypatch.setattr(bench, "train_run", train_run)
    out = tmp_path / "f.md"
    monkeypatch.setattr(sys, "argv", ["fp8.py", "--tokens", "4096", "--out", str(out), "--e2e-recipes",
                                      "delayed,rowwise"])
    bench.main()
    text = out.read_text()
    assert "# FP8 on Fake GPU 80GB" in text
    # 6 M K N / ms: 6 * 4096 * 2^24 / 1.0 ms = 412 TFLOP/s for every bf16 cell
    assert "| LLaMA-7B | fc1 | 4096 | 22016 | 4096 | 412 | 589 | 515 | 634 | 1.43 | 1.25 | 1.54 |" in text
    assert "| LLaMA-7B | layer (4 linears) |  |  | 4096 |  |  |  |  | 1.43 | 1.25 | 1.54 |" in text
    assert ("FP8 / bf16 at the LLaMA-7B layer shape >= 1.3: fp8-tensorwise 1.43 (met), fp8-rowwise 1.25 (missed), "
            "fp8-delayed 1.54 (met).") in text
    assert [a[a.index("--config") + 1].endswith("configs/gpt-1.3b.json") for a in runs] == [True] * 3
    assert [a[a.index("--train-iters") + 1] for a in runs] == ["200"] * 3
    assert [a[a.index("--fp8-recipe") + 1] if "--fp8-recipe" in a else "bf16" for a in runs] == [
        "bf16", "delayed", "rowwise"]
    assert "| fp8-delayed | 14,400 | 1.20 | 5.0500 | +1.00% |" in text
    assert ("- End to end, fp8-rowwise: 1.20x bf16 tokens/s, target >= 1.15 (met); loss +1.00% of bf16 over 200 "
            "iterations, target within 2% (met).") in text


def test_refuses_to_time_on_cpu(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["fp8.py"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2


def test_numerics_table_stays_within_the_rounding_bound(bench):
    head, rows = bench.numerics_table(32, torch.device("cpu"))
    assert len(rows) == 6 and head[3:5] == ["y rel L2", "y max/bound"]
    for row in rows:
        assert all(0 < float(v) <= 1 for v in row[4::2]), row  # max/bound columns

"""benchmarks/moe.py's table and routing counts, with its timer replaced by made-up figures (this checks the
script's bookkeeping on CPU, not any speed), and its refusal to run without a GPU."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "moe.py")


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("moe_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU 80GB")
    return module


def test_counts_cover_every_row(bench):
    even, skewed = bench.counts_for(16384, 8, "even"), bench.counts_for(16384, 8, "skewed")
    assert even.sum() == skewed.sum() == 16384 and even.tolist() == [2048] * 8
    assert skewed.tolist() == sorted(skewed.tolist(), reverse=True) and skewed[0] > 2 * skewed[3]


def test_table(bench, tmp_path, monkeypatch):
    names = ["ours-triton", "torch-bmm", "torch-loop", "torch-grouped-mm"]
    monkeypatch.setattr(bench, "runners", lambda: {n: n for n in names})
    speed = {"ours-triton": 500.0, "torch-bmm": 300.0, "torch-loop": 400.0, "torch-grouped-mm": "n/a (refused)"}
    monkeypatch.setattr(bench, "time_expert_mlp", lambda run, *a: speed[run])
    out = tmp_path / "moe.md"
    monkeypatch.setattr(sys, "argv", ["moe.py", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert "# MoE expert compute on Fake GPU 80GB" in text
    assert "| 8 | even | 500.0 | 300.0 | 400.0 | n/a (refused) | 1.25 |" in text
    assert "| 2 | skewed | 500.0 | 300.0 | 400.0 | n/a (refused) | 1.25 |" in text


def test_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr

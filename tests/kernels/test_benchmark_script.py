"""benchmarks/kernels.py's tables and target lines, with its timers replaced by made-up figures (this checks
the script's bookkeeping on CPU, not any speed): a GPU run must not die on its last line."""
import importlib.util
import os
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernels.py")


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Fake GPU 80GB")
    monkeypatch.setattr(module, "copy_bandwidth_gbs", lambda: 1000.0)
    runners = {"ours": "ours", "sdpa-flash": "flash", "sdpa-efficient": "efficient", "sdpa-cudnn": "cudnn"}
    monkeypatch.setattr(module, "attention_runners", lambda: runners)
    speed = {"ours": 110.0, "flash": 100.0, "efficient": 80.0, "cudnn": "n/a (refused)"}
    monkeypatch.setattr(module, "time_attention", lambda run, seq, hd, causal, bwd: speed[run] if isinstance(
        speed[run], str) else speed[run] * (1.2 if seq == 4096 else 1.0))
    norm = {"ours-triton": 900.0, "ours-cuda": 700.0, "torch": 500.0, "torch.compile": 850.0}
    monkeypatch.setattr(module, "norm_runners", lambda: {k: {n: n for n in norm} for k in ("layernorm", "rmsnorm")})
    monkeypatch.setattr(module, "time_norm", lambda run, hidden: norm[run])
    per_call = {"ours-triton": 41.0, "ours-cuda": 30.0, "torch": 25.0, "torch.compile": 60.0}
    monkeypatch.setattr(module, "time_norm_call", lambda run, hidden: per_call[run])
    return module


def test_full_run_writes_tables_and_targets(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "k.md"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--quick", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert "# Fused kernels on Fake GPU 80GB" in text and "Date: " in text
    assert "| fwd+bwd | 128 | True | 4096 | 132.0 | 120.0 | 96.0 | n/a (refused) | 1.10 | 1.38 | - |" in text
    assert "ours / best SDPA backend >= 1.0: met at 1 of 1 lengths (4096: 1.10)" in text
    # Triton: 0.90 of copy and 1.8x eager meets both; the CUDA extension's 0.70 of copy does not.
    assert "met at 4 of 8 (kernel, hidden, backend) cells" in text
    assert "layernorm 4096 ours-cuda (0.70 of copy, 1.40x eager)" in text


def test_only_one_half(bench, tmp_path, monkeypatch):
    out = tmp_path / "k.md"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--quick", "--only", "norms", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert "Attention TFLOP/s" not in text and "LayerNorm / RMSNorm" in text and "--only norms" in text


def test_issue15_targets_and_per_call_cost(bench, tmp_path, monkeypatch):
    out = tmp_path / "k.md"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--quick", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert ("- Attention fwd+bwd, head dim 128, ours / best SDPA backend >= 1.0 (issue 15): met at 4 of 4 (causal, "
            "seq) cells (full 1024: 1.10, full 4096: 1.10, causal 1024: 1.10, causal 4096: 1.10).") in text
    assert "- Attention fwd, head dim 128, ours / best SDPA backend >= 1.0 (issue 15): met at 4 of 4" in text
    assert ("- Norms forward+backward (ours-triton) >= 85% of copy for hidden >= 2048 and ahead of torch eager and "
            "Liger at every width (issue 15): met at 4 of 4 cells; missed: none.") in text
    assert "## Norm per-call cost: microseconds per forward+backward at 16 rows, hidden 4096" in text
    assert "| layernorm | 4096 | 41.0 | 30.0 | 25.0 | 60.0 |" in text


def test_issue15_norm_target_names_the_misses(bench):
    measured = {("layernorm", 1024): {"ours-triton": 500.0, "torch": 600.0, "liger": 400.0},
                ("layernorm", 4096): {"ours-triton": 800.0, "torch": 600.0, "liger": "n/a (x)"},
                ("rmsnorm", 4096): {"ours-triton": 900.0, "torch": 600.0, "liger": 950.0}}
    line = bench.issue15_norm_target(measured, 1000.0)
    assert "met at 0 of 3 cells; missed: layernorm 1024 (0.50 of copy), layernorm 4096 (0.80 of copy), " \
           "rmsnorm 4096 (0.90 of copy)." in line

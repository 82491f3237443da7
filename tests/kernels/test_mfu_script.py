"""benchmarks/mfu.py's bookkeeping (tokens/s, MFU, ratios, targets) with made-up step times, and one real run
at its tiny CPU shape in a child process (every run, the compiled ones too, must train and be reported); and
benchmarks/gpu_check.sh parses and refuses to run without a GPU. No speed is measured here."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "mfu.py")


@pytest.fixture(scope="module")
def mfu():
    spec = importlib.util.spec_from_file_location("mfu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figures_and_ratios(mfu):
    times = {"megaengine": [0.5, 0.4, 0.6], "megaengine+compile": [0.4], "plain": [1.0], "plain+compile": [0.45]}
    rows = mfu.summarize(times, tokens_per_step=1000, flops_token=2e9, peak_tflops=10.0)
    assert rows["megaengine"] == pytest.approx((2000.0, 4.0, 0.4, 0.5))  # the median step
    assert rows["megaengine+compile"][2] == pytest.approx(0.5)
    lines = mfu.ratio_lines(rows)
    assert "- megaengine / plain: 2.000x" in lines and "- megaengine+compile / plain+compile: 1.125x" in lines
    assert "- best megaengine run: megaengine+compile, MFU 50.0% (target >= 60%: not met)" in lines
    assert "- megaengine+compile / plain+compile: 1.125x (target >= 1.05: met)" in lines
    cpu = mfu.summarize({"megaengine": [1.0], "plain": [2.0]}, 10, 1e9, None)
    assert cpu["megaengine"][2] is None and "MFU n/a (no known peak)" in mfu.ratio_lines(cpu)[-1]


def test_measure_alternates_and_skips_warmup(mfu):
    calls, clock = [], iter(range(100))
    steps = {"a": lambda t, l: calls.append("a"), "b": lambda t, l: calls.append("b")}
    times = mfu.measure(steps, [(None, None)] * 4, warmup=1, sync=lambda: None, clock=lambda: next(clock))
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_cpu_run_reports_every_run(tmp_path):
    out = tmp_path / "mfu.md"
    env = {**os.environ, "PYTHONPATH": os.path.abspath(ROOT)}
    done = subprocess.run([sys.executable, SCRIPT, "--iters", "2", "--warmup", "1", "--compile", "--compile-backend",
                           "eager", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "CPU figures, fp32, not GPU ones; MFU n/a" in text
    assert "GPT 2 layers, hidden 64, 4 heads, seq 32, batch 2, vocab 256" in text
    for run in ("megaengine", "megaengine+compile", "plain", "plain+compile"):
        assert f"| {run} | " in text
    assert "- megaengine+compile / plain+compile: " in text and "MFU n/a (no known peak)" in text
    assert done.stdout.strip().endswith(text.strip().splitlines()[-1])


def test_gpu_check_script_parses_and_needs_a_gpu():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr

"""pretrain_gpt.py under real torchrun: the main job trains, and a user mistake is reported once by rank 0."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc, *args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "pretrain_gpt.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_readme_main_job_trains_on_embedded_corpus(tmp_path):
    out = torchrun(4, "--config", "configs/gpt-tiny.json", "--tp", "2", "--train-iters", "20", "--log-interval", "5",
                   "--eval-interval", "20", "--eval-iters", "1", "--sample-tokens", "8",
                   "--metrics-file", str(tmp_path / "m.jsonl"), env={"MEGAENGINE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tp 2 pp 1 dp 2" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("iter ")]
    assert len(lines) == 4, out.stdout
    losses = [float(line.split("| loss ")[1].split()[0]) for line in lines]
    assert losses[-1] < losses[0] - 0.5, losses
    assert "validation at iter 20" in out.stdout and "sample:" in out.stdout


def test_bad_layout_reported_once_from_rank0_without_traceback():
    out = torchrun(4, "--config", "configs/gpt-tiny.json", "--tp", "3", timeout=120)
    assert out.returncode != 0
    ours = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("megaengine: error:")]
    assert ours == ["megaengine: error: world size 4 is not divisible by tp x pp = 3 x 1 = 3. Launch a multiple of 3 "
                    "processes (torchrun --nproc_per_node), or change --tp/--pp."], out.stderr[-2000:]
    assert "[rank" not in out.stderr  # no worker traceback

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
    assert "validation at iter 20" in out.stdout and "sample (prompt 'def main(', 8 tokens):\ndef main(" in out.stdout
    assert out.stdout.count("first run: building the embedded corpus") == 1  # the seconds of silence, explained


def test_bad_layout_reported_once_from_rank0_without_traceback():
    out = torchrun(4, "--config", "configs/gpt-tiny.json", "--tp", "3", timeout=120)
    assert out.returncode != 0
    ours = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("megaengine: error:")]
    assert ours == ["megaengine: error: world size 4 is not divisible by tp x pp = 3 x 1 = 3. Launch a multiple of 3 "
                    "processes (torchrun --nproc_per_node), or change --tp/--pp."], out.stderr[-2000:]
    assert "[rank" not in out.stderr  # no worker traceback


def losses_of(metrics):
    import json
    return [json.loads(line)["loss"] for line in open(metrics) if '"loss"' in line]


def test_headline_command_tp4_pp2_on_8_processes(tmp_path):
    out = torchrun(8, "--config", "configs/gpt-tiny.json", "--tp", "4", "--pp", "2", "--train-iters", "4",
                   "--log-interval", "1", "--eval-iters", "0", "--sample-tokens", "4",
                   "--metrics-file", str(tmp_path / "m.jsonl"), env={"MEGAENGINE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tp 4 pp 2 dp 1" in out.stdout and "sample (prompt 'def main('" in out.stdout
    assert len(losses_of(tmp_path / "m.jsonl")) == 4


def test_two_nodes_train_like_one(tiny_corpus, tmp_path):
    """Two torchrun agents ("nodes") of 2 ranks each, c10d rendezvous on 127.0.0.1, against one node of 4."""
    from megaengine.testing import free_port
    prefix, tok = tiny_corpus
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3",
             "--tp", "2", "--data-path", prefix, "--tokenizer-model", tok, "--log-interval", "1",
             "--eval-iters", "0", "--sample-tokens", "0", "--make-vocab-size-divisible-by", "8"]
    one = torchrun(4, *flags, "--metrics-file", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n), "--nproc_per_node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
         "pretrain_gpt.py", *flags, "--metrics-file", str(tmp_path / "two.jsonl")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for n in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert losses_of(tmp_path / "two.jsonl") == losses_of(tmp_path / "one.jsonl")

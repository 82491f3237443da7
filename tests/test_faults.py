"""Crashes: kill -9 during training and during a save, and torchrun restarts, lose nothing.

Each run trains a tiny GPT under real torchrun, logging every iteration to JSON lines; a resumed run appends
to the same file. The losses of the interrupted-and-resumed run must equal an uninterrupted run's
(same layout: exact resume, <= 1e-6 relative).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaengine.testing import run_distributed

ROOT = Path(__file__).resolve().parents[1]
ITERS = 40


def flags(tiny_corpus, save, metrics):
    prefix, tok = tiny_corpus
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "1e-3",
            "--tp", "2", "--hidden-dropout", "0.1", "--data-path", prefix, "--tokenizer-model", tok,
            "--make-vocab-size-divisible-by", "8", "--log-interval", "1", "--eval-iters", "0",
            "--sample-tokens", "0", "--save", str(save), "--save-interval", "3", "--metrics-file", str(metrics)]


def launch(args, *torchrun_flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           *torchrun_flags, "pretrain_gpt.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(proc, timeout=300):
    """Wait for a launched job; on a timeout kill its whole process group so nothing is left running."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"the job did not finish in {timeout}s: {err[-3000:]}") from None
    return proc.returncode, err


def losses(metrics):
    """The loss of each iteration; a resumed run's records replace the ones it repeats."""
    out = {}
    if os.path.exists(metrics):
        for line in open(metrics):
            r = json.loads(line)
            if "loss" in r:
                out[r["iteration"]] = r["loss"]
    return out


def wait_for_iteration(metrics, n, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(metrics), default=0) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"iteration {n} not reached")


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    code, err = finish(launch(flags(tiny_corpus, tmp / "ckpt", tmp / "m.jsonl")))
    assert code == 0, err[-3000:]
    return losses(tmp / "m.jsonl")


def assert_continues(resumed, reference):
    assert sorted(resumed) == sorted(reference) == list(range(1, ITERS + 1))
    for it, loss in reference.items():
        assert abs(resumed[it] - loss) <= 1e-6 * abs(loss), (it, resumed[it], loss)


def test_kill_9_then_restart_continues_the_loss_curve(tiny_corpus, tmp_path, uninterrupted):
    args = flags(tiny_corpus, tmp_path / "ckpt", tmp_path / "m.jsonl")
    proc = launch(args)
    wait_for_iteration(tmp_path / "m.jsonl", 10, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker, mid-iteration
    proc.wait()
    code, err = finish(launch(args))  # no --load: a job restarted on its --save directory resumes from it
    assert code == 0, err[-3000:]
    assert_continues(losses(tmp_path / "m.jsonl"), uninterrupted)


def test_torchrun_max_restarts_resumes_after_a_worker_dies(tiny_corpus, tmp_path, uninterrupted):
    proc = launch(flags(tiny_corpus, tmp_path / "ckpt", tmp_path / "m.jsonl"), "--max-restarts", "2")
    wait_for_iteration(tmp_path / "m.jsonl", 10, proc)
    agent_children = children(proc.pid)
    workers = [k for c in agent_children for k in children(c)] or agent_children
    os.kill(workers[-1], signal.SIGKILL)  # one worker dies; torchrun restarts the group
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert_continues(losses(tmp_path / "m.jsonl"), uninterrupted)


def _die_during_save(rank, world, argv):
    """Rank 0 is killed (SIGKILL) in the middle of writing the checkpoint of iteration 6."""
    from megaengine.checkpoint import manager
    from megaengine.training import trainer
    save_file = manager.save_file

    def save_and_die(path, obj):
        size = save_file(path, obj)
        if rank == 0 and "iter_0000006" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        return size
    manager.save_file = save_and_die
    return trainer.main(argv)


def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(tiny_corpus, tmp_path, uninterrupted):
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = flags(tiny_corpus, save, metrics) + ["--distributed-timeout-minutes", "0.2"]
    with pytest.raises(RuntimeError, match="rank 0: no result"):
        run_distributed(_die_during_save, 4, args, timeout=60)
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    code, err = finish(launch(args))
    assert code == 0, err[-3000:]
    assert_continues(losses(metrics), uninterrupted)


def test_a_stuck_rank_is_reported_and_the_job_exits(tiny_corpus):
    prefix, tok = tiny_corpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/scripts/hang_one_rank.py", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
           "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5",
           "--lr", "1e-3", "--data-path", prefix, "--tokenizer-model", tok, "--eval-iters", "0", "--sample-tokens",
           "0", "--make-vocab-size-divisible-by", "8", "--distributed-timeout-minutes", "0.1"]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert time.monotonic() - start < 120  # never a silent hang
    # The dp reduction launched during the backward is waited on in the optimizer step.
    assert ("megaengine: error: rank 0 (tp 0, pp 0, dp 0) gave up in the optimizer step of "
            "iteration 2: a peer did not answer within --distributed-timeout-minutes 0.1") in out.stderr, out.stderr[-3000:]

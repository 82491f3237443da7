"""The README's two commands are the ones CI runs and the ones that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    train, test = readme_commands()
    assert "torchrun --nproc_per_node 4 pretrain_gpt.py --config configs/gpt-tiny.json --tp 2 --pp 2" in train
    assert "pip install -q torch==2.13.0" in train and "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci


def test_referenced_files_exist():
    for path in ["configs/gpt-tiny.json", "pretrain_gpt.py", "examples/custom_model.py", "launch/multinode.sh",
                 "launch/slurm.sbatch", "benchmarks/step_overhead.py", "configs/moe-tiny.json",
                 "configs/mixtral-8x7b.json", "benchmarks/moe.py"]:
        assert (ROOT / path).exists(), path

"""Every csrc/*.cu compiles with nvcc, alone (CUDA headers only), for Ampere (sm_80) and Hopper (sm_90a)."""
import glob
import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_compiles_for_sm80_and_sm90a(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot compile csrc/*.cu here")
    cmd = [nvcc, "-c", source, "-o", str(tmp_path / "out.o"), "-O3", "-std=c++17", "--Werror", "all-warnings",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"

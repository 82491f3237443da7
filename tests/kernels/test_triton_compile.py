"""Every Triton config the autotuners may try compiles for sm_80 and sm_90, fits in shared memory, spills no
registers and, in attention, uses tensor cores (megaengine.kernels.compile_check, no GPU needed). The check runs in a child process with
TRITON_INTERPRET=0, since this test session interprets the kernels."""
import json
import os
import subprocess
import sys

import pytest

from megaengine.kernels import compile_check

pytest.importorskip("triton")
FAMILIES = sorted(compile_check.jobs())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "megaengine.kernels.compile_check", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode == 2:
        pytest.skip(done.stderr.strip())
    assert out.exists(), f"compile_check wrote nothing (exit {done.returncode}):\n{done.stdout[-3000:]}\n" \
                         f"{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_kernel_family_is_checked():
    assert {family.rsplit("-", 1)[0] for family in FAMILIES} == {
        "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_delta", "_layer_norm_fwd", "_layer_norm_bwd",
        "_rms_norm_fwd", "_rms_norm_bwd", "_grouped_mm", "_grouped_mm_wgrad"}


@pytest.mark.parametrize("family", FAMILIES)
def test_configs_compile_fit_and_do_not_spill(family, results):
    mine = [r for r in results if r["family"] == family]
    assert mine, f"no results for {family}"
    bad = [f"{r['job']}: {r['problem']}" for r in mine if r["problem"]]
    assert not bad, f"{len(bad)} of {len(mine)} configs fail:\n" + "\n".join(bad)


def test_picks_follow_generation_dtype_and_block():
    """The autotuners' prune keeps per-generation tiles for fp16/bf16, small FMA-friendly tiles for fp32 on
    every GPU, and only norm configs with enough threads for the row block."""
    import torch

    from megaengine.kernels._shared import norm_pick
    from megaengine.kernels.attention import PICKS
    bf16 = {"Q": torch.empty(0, dtype=torch.bfloat16), "HEAD_DIM": 128}
    fp32 = {"Q": torch.empty(0, dtype=torch.float32), "HEAD_DIM": 128}
    for pick in PICKS.values():
        assert pick(9, bf16) is not pick(8, bf16)
        assert pick(9, fp32) is pick(8, fp32)
        assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in pick(9, fp32)) <= 32 * 32
    for kind, block_n, per_thread in (("fwd", 16384, 64), ("bwd", 8192, 32)):
        kept = norm_pick(kind)(9, {"BLOCK_N": block_n})
        assert kept and all(block_n <= per_thread * 32 * c.num_warps for c in kept)
        assert len(norm_pick(kind)(9, {"BLOCK_N": 1024})) > len(kept)


def test_aligned_rows_must_load_vectors():
    """The compile check's vector rule: an aligned row held 8+ elements per thread must be loaded 16 bytes at a
    time; unaligned rows, and threads holding fewer elements, are exempt."""
    def job(block_n, warps, aligned):
        constexprs = (("BLOCK_N", block_n), ("ONE_PASS", True), ("RMS", False), ("N_ALIGNED", aligned))
        return ("_layer_norm_bwd", 90, "bf16", constexprs, warps, 1)
    vectorised = {"registers": 96, "stack": 0, "local": 0, "shared": 1024, "wgmma": 0, "mma": 0, "vector_loads": 4}
    scalar = {**vectorised, "vector_loads": 0}
    assert compile_check.problem(job(2048, 4, True), vectorised) is None
    assert "vectors" in compile_check.problem(job(2048, 4, True), scalar)
    assert compile_check.problem(job(2048, 4, False), scalar) is None
    assert compile_check.problem(job(1024, 16, True), scalar) is None  # 2 elements per thread: one 4-byte load

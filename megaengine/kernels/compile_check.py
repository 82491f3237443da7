"""Ahead-of-time compile check of every Triton config the autotuner may try, for Ampere (sm_80) and Hopper
(sm_90), with the installed Triton's own ptxas: no GPU needed. Each config must compile, fit in the GPU's
shared memory, spill no registers (cuobjdump's STACK and LOCAL are 0), and turn attention's fp16/bf16 dots
into tensor-core instructions (wgmma on Hopper). The Triton interpreter runs the kernels' logic on CPU but
checks none of this; a config that fails here is skipped by the autotuner on a GPU (out of resources) or
runs slowly (spills, no tensor cores).

    TRITON_INTERPRET=0 python -m megaengine.kernels.compile_check [--json results.json]

prints one line per config (registers, shared memory, spills, tensor-core instructions, vector loads) and
exits 1 if any fails. Arguments are specialised as a launch on contiguous tensors specialises them: pointers
and strides 16-byte divisible, head-dim strides equal to 1; the norms' row width N both ways (a multiple of
16 or not), and an aligned row must be loaded as vectors where a thread holds 8 or more of its elements.
Attention is compiled causal, whose code is a superset of the non-causal one. tests/kernels/
test_triton_compile.py runs it in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)
FP32_POINTERS = {"LSE", "DELTA", "MEAN", "RSTD", "PARTIALS", "DQ_ACC"}
INT32_POINTERS = {"OFFS"}
# Upper-case arguments that are sizes, not pointers (attention's Q and K are pointers; the grouped GEMM's are sizes).
INT_ARGS = {"_grouped_mm": {"M", "N", "K", "G"}, "_grouped_mm_wgrad": {"P", "Q"}}
DEFAULT_INT_ARGS = {"M", "N"}
FLOAT_ARGS = {"eps", "scale", "scale_log2"}
# Attention kernels whose fp16/bf16 dots must run on tensor cores: wgmma on Hopper for head dims up to 128
# (the training sizes; 256's dk/dv tiles are too narrow for it), mma.sync at least everywhere.
TENSOR_CORE_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_grouped_mm", "_grouped_mm_wgrad"}
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def unavailable_reason():
    """Why configs cannot be compiled here, or None: the AOT API and the NVIDIA backend's binaries."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return f"no Triton with an ahead-of-time compile API ({error})"
    if not os.path.exists(_cuobjdump(triton)):
        return "this Triton ships no NVIDIA backend binaries (ptxas, cuobjdump)"
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        return "TRITON_INTERPRET is on: kernels are interpreted functions, which cannot be compiled"
    return None


def _cuobjdump(triton):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _kernel(name):
    from megaengine.kernels import attention, grouped_gemm, layernorm, rmsnorm
    for module in (attention, grouped_gemm, layernorm, rmsnorm):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def _signature(kernel, dtype, constexprs, name=""):
    """(signature, constexprs, attrs) for triton.compile, as a launch on contiguous tensors would make them.
    The pseudo-constexpr N_ALIGNED says whether the row width N is a multiple of 16, which a launch specialises
    on (it lets the norms load 16 bytes at a time)."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    aligned = constexprs.pop("N_ALIGNED", False)
    for i, arg in enumerate(kernel.arg_names):
        if arg == "N" and aligned:
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.startswith("stride_") and arg.endswith("d"):  # the head-dim stride of a contiguous tensor
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg.startswith("stride_"):
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif arg.isupper() and arg not in INT_ARGS.get(name, DEFAULT_INT_ARGS):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else "*i32" if arg in INT32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    return signature, constexprs, attrs


def compile_job(job) -> dict:
    """Compile one job, (kernel, arch, dtype, constexprs, num_warps, num_stages): its registers, shared
    memory and spills as cuobjdump reports them, or the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, arch, dtype, constexprs, num_warps, num_stages = job
    kernel = _kernel(name)
    signature, constexprs, attrs = _signature(kernel, dtype, dict(constexprs), name)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options=options.__dict__)
    except Exception as error:  # a config that does not compile is a finding, reported with the others
        return {"error": f"does not compile: {str(error).strip().splitlines()[-1][:300]}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(triton), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, timeout=120).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        return {"error": f"cuobjdump printed no resource usage: {usage[:300]!r}"}
    regs, stack, static_shared, local = map(int, found.groups())
    ptx = compiled.asm["ptx"]
    return {"registers": regs, "stack": stack, "local": local, "shared": compiled.metadata.shared + static_shared,
            "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync"),
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx))}


def problem(job, result) -> str | None:
    """What is wrong with a compiled job, or None."""
    if "error" in result:
        return result["error"]
    arch, found = job[1], []
    if result["shared"] > SHARED_LIMIT[arch]:
        found.append(f"needs {result['shared']} B of shared memory, more than sm_{arch}'s {SHARED_LIMIT[arch]}")
    if result["stack"] or result["local"]:
        found.append(f"spills registers ({result['registers']} registers, stack {result['stack']} B, "
                     f"local {result['local']} B)")
    name, dtype, constexprs = job[0], job[2], dict(job[3])
    # A thread holding 8 or more consecutive bf16 elements of an aligned row should load them 16 bytes at a time
    # (fewer holds are loaded whole anyway: 16 warps over 1024 columns give each thread 2, one 4-byte load).
    if constexprs.get("N_ALIGNED") and constexprs["BLOCK_N"] >= 8 * 32 * job[4] and not result.get("vector_loads"):
        found.append("aligned rows are not loaded as vectors (16 bytes at a time)")
    if name in TENSOR_CORE_KERNELS and dtype != "fp32":
        if arch >= 90 and constexprs.get("HEAD_DIM", 0) <= 128 and not result["wgmma"]:
            found.append("no wgmma on Hopper (mma.sync only, about half its tensor-core rate)")
        if not (result["wgmma"] or result["mma"]):
            found.append("no tensor-core instruction at all")
    return "; ".join(found) or None


def _attention_jobs():
    from megaengine.kernels.attention import PICKS
    jobs = {}
    for name, pick in PICKS.items():
        for arch in ARCHS:
            for dtype in ("bf16", "fp32"):
                for head_dim in (64, 128, 256):
                    args = {"Q": torch.empty(0, dtype=TORCH_DTYPE[dtype]), "HEAD_DIM": head_dim}
                    # dk/dv both ways: with and without accumulating dq atomically
                    for atomic, c in ((a, c) for a in ((False, True) if "dkdv" in name else (None,))
                                      for c in pick(arch // 10, {**args, "ATOMIC_DQ": bool(a)})):
                        constexprs = dict(HEAD_DIM=head_dim, CAUSAL=True, UPCAST=False,
                                          PRECISION="ieee" if dtype == "fp32" else "tf32", **c.kwargs)
                        if atomic is not None:
                            constexprs["ATOMIC_DQ"] = atomic
                        jobs.setdefault(f"{name}-sm{arch}", []).append(
                            (name, arch, dtype, tuple(constexprs.items()), c.num_warps, c.num_stages))
    for arch in ARCHS:  # not autotuned: the launcher's fixed block
        jobs[f"_attn_bwd_delta-sm{arch}"] = [
            ("_attn_bwd_delta", arch, "bf16", (("HEAD_DIM", d), ("BLOCK_M", 64 if d <= 128 else 32)), 4, 3)
            for d in (64, 128, 256)]
    return jobs


def _norm_jobs():
    from megaengine.kernels._shared import CHUNK, ONE_PASS_MAX, ONE_PASS_MAX_BWD, norm_pick
    jobs = {}
    # LayerNorm and RMSNorm share one kernel per pass (norms.py); the RMS flag compiles it either way.
    for kind, one_pass_max, kernels in (("fwd", ONE_PASS_MAX, {"_layer_norm_fwd": {"RMS": False, "HAS_BIAS": True},
                                                                "_rms_norm_fwd": {"RMS": True, "HAS_BIAS": False}}),
                                        ("bwd", ONE_PASS_MAX_BWD, {"_layer_norm_bwd": {"RMS": False},
                                                                   "_rms_norm_bwd": {"RMS": True}})):
        for name, extra in kernels.items():
            for arch in ARCHS:
                # (BLOCK_N, ONE_PASS, row widths): hidden 2048 and 4096, the training widths, aligned only.
                blocks = ((1024, True, (False, True)), (2048, True, (True,)), (4096, True, (True,)),
                          (one_pass_max, True, (False, True)), (CHUNK, False, (False, True)))
                for block_n, one_pass, aligned in ((b, o, a) for b, o, widths in blocks for a in widths):
                    for c in norm_pick(kind)(arch // 10, {"BLOCK_N": block_n, "ONE_PASS": one_pass}):
                        constexprs = dict(BLOCK_N=block_n, ONE_PASS=one_pass, **extra, **c.kwargs, N_ALIGNED=aligned)
                        jobs.setdefault(f"{name}-sm{arch}", []).append(
                            (name, arch, "bf16", tuple(constexprs.items()), c.num_warps, c.num_stages))
    return jobs


def _grouped_gemm_jobs():
    """Both launches of the forward kernel (y = x W^T reads W transposed, the input gradient reads it as stored:
    a different unit stride each) and the weight-gradient kernel, contiguous tensors, up to 64 local experts."""
    from megaengine.kernels import grouped_gemm as gg
    unit_strides = {"_grouped_mm": [("stride_xk", "stride_wk", "stride_yn"), ("stride_xk", "stride_wn", "stride_yn")],
                    "_grouped_mm_wgrad": [("stride_ap", "stride_bq", "stride_cq")]}
    jobs = {}
    for name, table in (("_grouped_mm", gg.MM_CONFIGS), ("_grouped_mm_wgrad", gg.WGRAD_CONFIGS)):
        for arch in ARCHS:
            for dtype in ("bf16", "fp32"):
                for c in table[TORCH_DTYPE[dtype].itemsize]:
                    for strides in unit_strides[name]:
                        constexprs = dict(c.kwargs, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32",
                                          **({"BLOCK_G": 64} if name == "_grouped_mm" else {}),
                                          **{s: 1 for s in strides})
                        jobs.setdefault(f"{name}-sm{arch}", []).append(
                            (name, arch, dtype, tuple(constexprs.items()), c.num_warps, c.num_stages))
    return jobs


def jobs() -> dict:
    """Every config the autotuners may try, by family ("<kernel>-sm<arch>")."""
    return {**_attention_jobs(), **_norm_jobs(), **_grouped_gemm_jobs()}


def describe(job) -> str:
    name, arch, dtype, constexprs, num_warps, num_stages = job
    shown = ", ".join(f"{k}={v}" for k, v in constexprs if k not in ("CAUSAL", "UPCAST", "PRECISION")
                      and not k.startswith("stride_"))
    return f"{name} sm_{arch} {dtype} {shown} warps={num_warps} stages={num_stages}"


def run_all(workers: int | None = None) -> list:
    """[(family, job, result)] for every job, compiled in `workers` processes (default: all cores, at most 8)."""
    every = [(family, job) for family, family_jobs in jobs().items() for job in family_jobs]
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(compile_job, [job for _, job in every]))
    return [(family, job, result) for (family, job), result in zip(every, results)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write every result to this file")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"compile_check: cannot run: {reason}", file=sys.stderr)
        return 2
    rows = run_all(args.workers)
    failed = 0
    for family, job, result in rows:
        why = problem(job, result)
        failed += why is not None
        usage = "" if "error" in result else (f"regs {result['registers']:3d}  shared {result['shared']:6d} B  "
                                               f"spill {result['stack'] + result['local']} B  "
                                               f"wgmma {result['wgmma']} mma {result['mma']} "
                                               f"vector loads {result['vector_loads']}")
        print(f"{'FAIL' if why else 'ok  '}  {describe(job):70s} {usage}  {why or ''}")
    print(f"{len(rows) - failed} of {len(rows)} configs pass")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"family": family, "job": describe(job), "result": result, "problem": problem(job, result)}
                       for family, job, result in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

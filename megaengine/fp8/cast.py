"""Casts and the scaled matmul: amax -> scale -> FP8, and `gemm` on torch._scaled_mm with fp32 accumulation.

Conventions (Transformer Engine's and torchao's): `scale` multiplies a tensor before the cast,
`scale = fp8_max / amax / 2^margin`, so the largest magnitude lands on the format's largest value; the
matmul gets the inverse (`scale.reciprocal()`) to undo it. A scale is a 0-d tensor (per tensor) or, for
rowwise scaling, keeps the reduced dimension: (rows, 1) or (1, columns).

torch._scaled_mm(a, b, scale_a, scale_b) computes (a * scale_a) @ (b * scale_b). On CUDA (torch 2.11 on
Hopper) it needs `a` row-major and `b` column-major, K and N multiples of 16, fp32 scales that are scalars or
(M, 1) and (1, N) contiguous; rowwise scaling writes bf16 only and needs `b` in e4m3 (the CUTLASS kernel);
two e5m2 operands are refused by cuBLAS. The operands here never break those rules: gradients (e5m2 with
--fp8-format hybrid) are always the left operand. On CPU (torch 2.13) torch emulates it exactly as
"dequantize to fp32, then an fp32 matmul", for both scalings; where a CPU torch lacks rowwise, `scaled_mm`
runs that same emulation itself.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import torch

from megaengine.fp8.formats import FP8Format
from megaengine.parallel import comm

Shards = Sequence[tuple[Any, int]]  # (process group, the dim split over it)
EPS = 1e-12  # amax floor (torchao's): an all-zero tensor gets a large finite scale and casts to zeros


class Quantized(NamedTuple):
    """An FP8 tensor and the scale it was multiplied by; `.t()` transposes both."""
    data: torch.Tensor
    scale: torch.Tensor

    def t(self) -> "Quantized":
        return Quantized(self.data.t(), self.scale.t() if self.scale.dim() == 2 else self.scale)


def amax(t: torch.Tensor, dim: int | None = None, shards: Shards = ()) -> torch.Tensor:
    """max |t| in fp32: over everything (dim None) or over `dim`, kept as a size-1 dim. `shards` lists
    (group, d): t is one piece of a tensor split along its dim d over that group; when d is reduced, the result
    is MAX-reduced over the group, so every layout gets the amax of the whole tensor."""
    a = (t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)).float()
    for group, d in shards:
        if dim is None or dim % t.dim() == d % t.dim():
            comm.all_reduce_max(a, group)
    return a


def amax_to_scale(a: torch.Tensor, fmt: FP8Format, margin: int = 0) -> torch.Tensor:
    return fmt.max / a.clamp(min=EPS) / 2.0 ** margin


def cast_to_fp8(t: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Saturating cast of t * scale (e4m3fn has no infinity: out-of-range values would become NaN)."""
    return (t.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize(t: torch.Tensor, fmt: FP8Format, dim: int | None = None, shards: Shards = (),
             margin: int = 0) -> Quantized:
    """Current scaling: the scale comes from this tensor's own amax (per tensor, or per slice along `dim`)."""
    scale = amax_to_scale(amax(t, dim, shards), fmt, margin)
    return Quantized(cast_to_fp8(t, scale, fmt), scale)


def gemm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b for a (M, K) and b (K, N) in FP8, accumulated in fp32, written in `out_dtype`. Scales are 0-d, or
    per row of a (M, 1) and per column of b (1, N)."""
    a_data = a.data.contiguous()
    b_data = b.data.t().contiguous().t()  # column-major; free when b is the transpose of a row-major tensor
    return scaled_mm(a_data, b_data, a.scale.reciprocal(), b.scale.reciprocal(), out_dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    rowwise = inv_a.numel() > 1 or inv_b.numel() > 1
    if a.is_cuda:
        _check_cuda_shapes(a, b)
        # the rowwise kernel writes bf16 only; other dtypes are cast from it
        dtype = torch.bfloat16 if rowwise else out_dtype
        out = torch._scaled_mm(a, b, inv_a, inv_b, out_dtype=dtype, use_fast_accum=False)
        return out.to(out_dtype)
    if rowwise and not _cpu_rowwise_supported():
        return ((a.float() * inv_a) @ (b.contiguous().float() * inv_b)).to(out_dtype)
    return torch._scaled_mm(a, b, inv_a, inv_b, out_dtype=out_dtype, use_fast_accum=False)


def _check_cuda_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    (m, k), n = a.shape, b.shape[1]
    if k % 16 or n % 16:
        raise ValueError(f"FP8 matmul of ({m} x {k}) by ({k} x {n}) on CUDA: the inner size and the output "
                         "columns must be multiples of 16 (hidden, ffn and tokens per micro-batch x seq).")


@functools.lru_cache(maxsize=None)
def _cpu_rowwise_supported() -> bool:
    """torch's CPU _scaled_mm gained rowwise scales after tensorwise; older versions assert on them."""
    a = torch.zeros(2, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(2, 1), torch.ones(1, 2), out_dtype=torch.float32)
    except (RuntimeError, ValueError):
        return False
    return True

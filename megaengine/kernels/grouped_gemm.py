"""Grouped GEMM for Mixture-of-Experts: rows of x sorted by group (expert), each group multiplied by its own
weight, as one launch. The Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), the torch path (one padded
batched matmul, no Python loop over groups) and the per-group reference loop they are tested against.

    y = grouped_linear(x, weight, counts)   # x (rows, in), weight (groups, out, in), counts (groups,)
    y[rows of group g] = x[rows of group g] @ weight[g].T      (F.linear per group; counts sum to rows)

The forward kernel tiles each group's rows in BLOCK_M pieces; every program finds its group from the counts
inside the kernel (a cumulative sum over at most BLOCK_G groups), so nothing is copied to the host and the grid
is an upper bound, cdiv(rows, BLOCK_M) + groups, whose spare programs exit. The same kernel computes the
input gradient (weight strides swapped); a second one computes each group's weight gradient
x_g^T dy_g, one program per output tile looping over the group's rows, with no atomics (deterministic).
"""
from __future__ import annotations

import torch

from megaengine.kernels._shared import (cdiv, check_launchable, interpreted, next_power_of_2, on_device,
                                       resolve_backend, tl, triton, upcast_dot)


@triton.jit
def _grouped_mm(X, W, Y, OFFS, M, K, N, G, stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym,
                stride_yn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Y[rows of g] = X[rows of g] @ W[g], W[g] read as (K, N) through its strides. OFFS: (G + 1) row offsets."""
    tile = tl.program_id(0)
    gs = tl.arange(0, BLOCK_G)
    starts = tl.load(OFFS + gs, mask=gs < G, other=0)
    ends = tl.load(OFFS + 1 + gs, mask=gs < G, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
    g = tl.sum((tile_ends <= tile).to(tl.int32), 0)  # groups whose tiles all come before this one
    if g < G:
        first_tile = tl.sum(tl.where(gs < g, tiles, 0), 0)
        row_end = tl.load(OFFS + g + 1).to(tl.int64)
        rows = tl.load(OFFS + g).to(tl.int64) + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_group = W + g.to(tl.int64) * stride_wg
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=(rows[:, None] < row_end) & (ks[None, :] < K), other=0.0)
            b = tl.load(w_group + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc = upcast_dot(a, b, acc, UPCAST, PRECISION)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
                 mask=(rows[:, None] < row_end) & (cols[None, :] < N))


@triton.jit
def _grouped_mm_wgrad(A, B, C, OFFS, P, Q, stride_am, stride_ap, stride_bm, stride_bq, stride_cg, stride_cp,
                      stride_cq, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """C[g] = A[rows of g]^T @ B[rows of g], (P, Q) per group; an empty group gets zeros."""
    g = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(OFFS + g).to(tl.int64)
    end = tl.load(OFFS + g + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        a = tl.load(A + ms[None, :] * stride_am + ps[:, None] * stride_ap,
                    mask=(ms[None, :] < end) & (ps[:, None] < P), other=0.0)  # (BLOCK_P, BLOCK_M): A^T
        b = tl.load(B + ms[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=(ms[:, None] < end) & (qs[None, :] < Q), other=0.0)
        acc = upcast_dot(a, b, acc, UPCAST, PRECISION)
    tl.store(C + g.to(tl.int64) * stride_cg + ps[:, None] * stride_cp + qs[None, :] * stride_cq,
             acc.to(C.dtype.element_ty), mask=(ps[:, None] < P) & (qs[None, :] < Q))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by input width; for the weight gradient read as (BLOCK_P,
# BLOCK_Q, BLOCK_M). fp32 dots run without tensor cores (exact, "ieee") and spill registers with the 16-bit
# tiles: they get a K step of 16. megaengine.kernels.compile_check compiles each for sm_80 and sm_90.
_SHAPES = {
    2: [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 2)],
    4: [(64, 64, 16, 4, 2), (64, 64, 16, 4, 3), (128, 64, 16, 8, 2)],
}


def _configs(names) -> dict:
    """{itemsize: [triton.Config]} with the three block sizes named `names`."""
    return {size: [triton.Config(dict(zip(names, shape[:3])), num_warps=shape[3], num_stages=shape[4])
                   for shape in shapes] for size, shapes in _SHAPES.items()}


def _for_width(table: dict, pointer: str):
    """An early_config_prune keeping the configs made for the element width of the `pointer` argument."""
    def prune(configs, nargs, **kwargs):
        wanted = table[min(4, max(2, nargs[pointer].element_size()))]
        return [c for c in configs if any(c is w for w in wanted)]
    return prune


MM_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"))
WGRAD_CONFIGS = _configs(("BLOCK_P", "BLOCK_Q", "BLOCK_M"))
_grouped_mm_tuned = triton.autotune(configs=MM_CONFIGS[2] + MM_CONFIGS[4], key=["K", "N", "G"],
                                    prune_configs_by={"early_config_prune": _for_width(MM_CONFIGS, "X")})(_grouped_mm)
_grouped_mm_wgrad_tuned = triton.autotune(
    configs=WGRAD_CONFIGS[2] + WGRAD_CONFIGS[4], key=["P", "Q"],
    prune_configs_by={"early_config_prune": _for_width(WGRAD_CONFIGS, "A")})(_grouped_mm_wgrad)

INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # the interpreter runs one small config


def _dot_meta(kernel, x: torch.Tensor) -> dict:
    # fp32 exact, as torch's default matmul; the precision is unused for 16-bit inputs.
    return dict(UPCAST=interpreted(kernel) and x.dtype != torch.float32,
                PRECISION="ieee" if x.dtype == torch.float32 or interpreted(kernel) else "tf32")


def offsets_of(counts: torch.Tensor) -> torch.Tensor:
    """(groups + 1,) int32 row offsets from per-group counts, on the counts' device (no host copy)."""
    return torch.nn.functional.pad(counts.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


def grouped_mm_forward(x, weight, offsets, transpose: bool = True, blocks: dict | None = None):
    """Triton: x (rows, K) times each group's weight, (groups, N, K) read transposed (F.linear, transpose=True)
    or (groups, K, N) as stored (the input gradient, transpose=False). `blocks` fixes the tiles (tests)."""
    check_launchable(_grouped_mm, x)
    groups = weight.shape[0]
    n, k = (weight.shape[1], weight.shape[2]) if transpose else (weight.shape[2], weight.shape[1])
    stride_wk, stride_wn = (weight.stride(2), weight.stride(1)) if transpose else (weight.stride(1), weight.stride(2))
    y = x.new_empty(x.shape[0], n)
    if x.shape[0] == 0:
        return y
    args = (x, weight, y, offsets, x.shape[0], k, n, groups, x.stride(0), x.stride(1), weight.stride(0), stride_wk,
            stride_wn, y.stride(0), y.stride(1))
    meta = dict(BLOCK_G=next_power_of_2(groups), **_dot_meta(_grouped_mm, x))
    with on_device(x):
        if interpreted(_grouped_mm) or blocks is not None:
            b = {**INTERPRET_BLOCKS, **(blocks or {})}
            grid = (cdiv(x.shape[0], b["BLOCK_M"]) + groups, cdiv(n, b["BLOCK_N"]))
            _grouped_mm[grid](*args, **b, **meta)
        else:
            grid = lambda m: (cdiv(x.shape[0], m["BLOCK_M"]) + groups, cdiv(n, m["BLOCK_N"]))  # noqa: E731
            _grouped_mm_tuned[grid](*args, **meta)
    return y


def grouped_mm_wgrad(dy, x, offsets, groups: int, blocks: dict | None = None):
    """Triton: (groups, N, K) weight gradient dy_g^T x_g of y = grouped F.linear(x), in x's dtype."""
    check_launchable(_grouped_mm_wgrad, x)
    p, q = dy.shape[1], x.shape[1]
    dw = x.new_empty(groups, p, q)
    meta = _dot_meta(_grouped_mm_wgrad, x)
    args = (dy, x, dw, offsets, p, q, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0),
            dw.stride(1), dw.stride(2))
    with on_device(x):
        if interpreted(_grouped_mm_wgrad) or blocks is not None:
            b = {"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_M": 16, **(blocks or {})}
            _grouped_mm_wgrad[(groups, cdiv(p, b["BLOCK_P"]), cdiv(q, b["BLOCK_Q"]))](*args, **b, **meta)
        else:
            grid = lambda m: (groups, cdiv(p, m["BLOCK_P"]), cdiv(q, m["BLOCK_Q"]))  # noqa: E731
            _grouped_mm_wgrad_tuned[grid](*args, **meta)
    return dw


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transpose: bool) -> torch.Tensor:
    return grouped_mm_forward(x, weight, offsets, transpose)


@_grouped_mm_op.register_fake
def _(x, weight, offsets, transpose):
    return x.new_empty(x.shape[0], weight.shape[1] if transpose else weight.shape[2])


@torch.library.custom_op("megaengine::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, groups: int) -> torch.Tensor:
    return grouped_mm_wgrad(dy, x, offsets, groups)


@_grouped_mm_wgrad_op.register_fake
def _(dy, x, offsets, groups):
    return x.new_empty(groups, dy.shape[1], x.shape[1])


class GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch.ops.megaengine.grouped_mm(x, weight, offsets, True)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.ops.megaengine.grouped_mm(dy, weight, offsets, False) if ctx.needs_input_grad[0] else None
        dw = torch.ops.megaengine.grouped_mm_wgrad(dy, x, offsets, weight.shape[0]) if ctx.needs_input_grad[1] \
            else None
        return dx, (None if dw is None else dw.to(weight.dtype)), None


# ----------------------------------------------------------------------------------------------------------
# torch: the CPU path and the reference
# ----------------------------------------------------------------------------------------------------------

def grouped_linear_torch(x, weight, counts):
    """Every group's rows scattered into a (groups, largest group, in) buffer, one batched matmul, gathered
    back: no loop over groups, at the price of the padding (exact; the padded rows are zeros, never read)."""
    groups, rows = weight.shape[0], x.shape[0]
    counts = counts.to(device=x.device, dtype=torch.long)
    group = torch.repeat_interleave(torch.arange(groups, device=x.device), counts, output_size=rows)
    position = torch.arange(rows, device=x.device) - (counts.cumsum(0) - counts)[group]
    padded = x.new_zeros(groups, int(counts.max()), x.shape[1]).index_put((group, position), x)
    return torch.bmm(padded, weight.transpose(1, 2))[group, position]


def grouped_linear_reference(x, weight, counts):
    """The definition, one F.linear per group: the test oracle."""
    pieces = x.split(counts.tolist())
    return torch.cat([torch.nn.functional.linear(p, w) for p, w in zip(pieces, weight)]
                     + [x.new_empty(0, weight.shape[1])])


def grouped_linear(x, weight, counts, backend=None):
    """x (rows, in) sorted by group, weight (groups, out, in), counts (groups,) rows per group (summing to rows):
    (rows, out). backend: "triton", "torch" (padded batched matmul) or None (Triton on CUDA, torch on CPU)."""
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[2] != x.shape[1] or counts.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, counts "
                         f"{tuple(counts.shape)} do not fit (rows, in), (groups, out, in), (groups,)")
    backend = resolve_backend(backend, x, ("triton", "torch"))
    if backend == "torch":
        return grouped_linear_torch(x, weight, counts)
    return GroupedLinear.apply(x.contiguous(), weight.contiguous(), offsets_of(counts.to(x.device)))

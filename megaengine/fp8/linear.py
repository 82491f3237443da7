"""The FP8 linear: y = x W^T, dgrad = dy W and wgrad = dy^T x, each one FP8 matmul with fp32 accumulation.

Per-tensor recipes (tensorwise, delayed) quantize x, W and dy once each; the backward keeps x in FP8 (half
the bytes of bf16) and re-casts W with its forward scale (the same bits; W itself is saved anyway, and under
ZeRO-3 it is gathered again for the backward). Rowwise quantizes each operand per slice along the dimension
its matmul keeps, so x, W and dy are cast twice, once per matmul that uses them (torchao's rowwise recipe),
and the backward keeps x and W in high precision.

Layouts: `parallel` ("column", "row" or None) says along which dim each 2-d operand (x (M, K), W (N, K),
dy (M, N)) is split over the tp `group`, and `token_group` (context parallelism) splits the tokens M of x and
dy. An amax over a split dim is MAX-reduced over its group, so the scales, and hence the result, are the same
at every layout. Sequence-parallel inputs are gathered before the matmul, so they need nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from megaengine.fp8.cast import Quantized, cast_to_fp8, gemm
from megaengine.fp8.config import FP8Config
from megaengine.fp8.scaling import DY, W, X
from megaengine.tensor_parallel.layers import ColumnParallelLinear


class TPSplits(NamedTuple):
    x: int | None
    w: int | None
    dy: int | None


REPLICATED = TPSplits(None, None, None)
COLUMN = TPSplits(x=None, w=0, dy=1)  # W split by output features: so is y, and dy
ROW = TPSplits(x=1, w=1, dy=None)  # W split by input features: so is x; dy is whole after the reduction
SPLITS = {None: REPLICATED, "column": COLUMN, "row": ROW}


def operand_shards(parallel: str | None, group, token_group=None) -> tuple:
    """Per slot (x, w, dy): the (group, dim) pairs it is split over."""
    splits = SPLITS[parallel]
    tokens = ((token_group, 0),) if token_group is not None else ()

    def tp(dim):
        return ((group, dim),) if dim is not None else ()
    return tp(splits.x) + tokens, tp(splits.w), tp(splits.dy) + tokens


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scaling, shards, record):
        xq = scaling.quantize(x, X, 1, shards[X], record)
        wq = scaling.quantize(w, W, 1, shards[W], record)
        y = gemm(xq, wq.t(), out_dtype=x.dtype)
        ctx.scaling, ctx.shards, ctx.record = scaling, shards, record
        ctx.save_for_backward(*((xq.data, xq.scale, w, wq.scale) if scaling.per_tensor else (x, w)))
        return y

    @staticmethod
    def backward(ctx, dy):
        s, shards = ctx.scaling, ctx.shards
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if s.per_tensor:
            x8, x_scale, w, w_scale = ctx.saved_tensors
            x_cols = Quantized(x8, x_scale)
            w_cols = Quantized(cast_to_fp8(w, w_scale, s.formats[W]), w_scale) if need_dx else None
            dy_rows = dy_cols = s.quantize(dy, DY, None, shards[DY], ctx.record)
        else:
            x, w = ctx.saved_tensors
            w_cols = s.quantize(w, W, 0, shards[W]) if need_dx else None
            dy_rows = s.quantize(dy, DY, 1, shards[DY]) if need_dx else None
            dy_cols = s.quantize(dy, DY, 0, shards[DY]) if need_dw else None
            x_cols = s.quantize(x, X, 0, shards[X]) if need_dw else None
        dx = gemm(dy_rows, w_cols, out_dtype=dy.dtype) if need_dx else None
        dw = gemm(dy_cols.t(), x_cols, out_dtype=w.dtype) if need_dw else None
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, scaling,
               group=None, parallel: str | None = None, token_group=None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the matmuls in FP8; `scaling` is the layer's CurrentScaling or
    DelayedScaling, `parallel` the tp layout of a ColumnParallelLinear ("column") or RowParallelLinear ("row")
    over `group`, None for whole operands; `token_group` the group the tokens are split over (context
    parallelism), None if they are not. Delayed scaling records amaxes only in a forward that builds a graph
    (training, or its recomputation), not in evaluation."""
    record = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    shards = operand_shards(parallel, group, token_group)
    y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, scaling, shards, record)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class FP8Linear(ColumnParallelLinear):
    """An FP8 linear layer for custom models: a ColumnParallelLinear with FP8 on, so it takes the same tp
    `group=` (None: the initialised tp group; a group of one: a plain dense layer). A row-parallel FP8 layer
    is RowParallelLinear(..., fp8=config)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 fp8: FP8Config = FP8Config(), **kwargs):
        super().__init__(in_features, out_features, bias, fp8=fp8, **kwargs)

"""LayerNorm over the last dimension: the Triton forward and backward kernels, the custom ops and autograd.Function
around them (Triton or the CUDA extension of megaengine.kernels.cuda), and the plain torch reference.

The forward saves mean and rstd (fp32, one per row). The backward computes dx in one pass over each row and
leaves dweight / dbias as per-program partial sums (one fp32 row per program), reduced once at the end.
Rows up to ONE_PASS_MAX (forward) / ONE_PASS_MAX_BWD (backward) elements are held in registers; longer ones (64K
and beyond) are walked in CHUNK-wide pieces.
"""
from typing import Optional

import torch

from megaengine.kernels import cuda as cuda_ext
from megaengine.kernels._shared import (ONE_PASS_MAX, ONE_PASS_MAX_BWD, backward_programs, check_launchable,
                                       check_norm_args, launch, norm_configs, resolve_backend, row_block, tl,
                                       triton)


@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, 0) / N + eps)
        y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Chan et al.'s pairwise update: each chunk's own mean and squared deviations, merged exactly, so a
        # large mean does not cancel away the variance as it would in E[x^2] - E[x]^2.
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(x, 0) / n_b
            xc = tl.where(mask, x - mean_b, 0.0)
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + tl.sum(xc * xc, 0) + delta * delta * (count * n_b / total)
            count = total
        rstd = tl.math.rsqrt(m2 / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART, stride_x, stride_dy, stride_dx, M, N,
                    rows_per_program, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)); program p also writes row p of the partial
    sums of dy*xhat (dweight) and dy (dbias) over its rows."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + r)
            xhat = tl.where(mask, (x - tl.load(MEAN + r)) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, 0) / N
            c2 = tl.sum(wdy, 0) / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
        tl.store(DW_PART + part + cols, dw, mask=mask)
        tl.store(DB_PART + part + cols, db, mask=mask)
    else:
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            mean = tl.load(MEAN + r)
            rstd = tl.load(RSTD + r)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                c1 += tl.sum(tl.where(mask, (x - mean) * rstd, 0.0) * wdy, 0)
                c2 += tl.sum(wdy, 0)
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # The program's first row starts its partial sums (so the buffer needs no zeroing and a
                # re-run by the autotuner does not double them); later rows add to them.
                # (a scalar-and-block `&` breaks the interpreter, hence the product)
                keep = cols < N * (row > row_start).to(tl.int32)
                dw = tl.load(DW_PART + part + cols, mask=keep, other=0.0) + dy * xhat
                db = tl.load(DB_PART + part + cols, mask=keep, other=0.0) + dy
                tl.store(DW_PART + part + cols, dw, mask=mask)
                tl.store(DB_PART + part + cols, db, mask=mask)
            tl.debug_barrier()


_layer_norm_fwd_tuned = triton.autotune(**norm_configs("fwd"))(_layer_norm_fwd)
_layer_norm_bwd_tuned = triton.autotune(**norm_configs("bwd"))(_layer_norm_bwd)


def layer_norm_forward(x, weight, bias, eps, y=None, mean=None, rstd=None, block_n=None):
    """Triton forward on 2-d x (rows, hidden): returns (y, mean, rstd). Outputs may be given (tests pass
    NaN-filled ones); `block_n` forces the block width (tests use it to reach the chunked path)."""
    check_launchable(_layer_norm_fwd, x)
    rows, n = x.shape
    y = torch.empty_like(x) if y is None else y
    mean = torch.empty(rows, device=x.device, dtype=torch.float32) if mean is None else mean
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32) if rstd is None else rstd
    if rows == 0:
        return y, mean, rstd
    block, one_pass = row_block(n, ONE_PASS_MAX, block_n)
    args = (x, weight, bias if bias is not None else weight, y, mean, rstd, x.stride(0), y.stride(0), n, eps)
    meta = dict(HAS_BIAS=bias is not None, BLOCK_N=block, ONE_PASS=one_pass)
    launch(_layer_norm_fwd, _layer_norm_fwd_tuned, (rows,), args, meta)
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, dx=None, partials=None, block_n=None):
    """Triton backward: returns (dx, dweight, dbias), dweight and dbias in weight's dtype. `partials` may be a
    given (2, programs, hidden) fp32 buffer, as the outputs may in layer_norm_forward."""
    check_launchable(_layer_norm_bwd, x)
    rows, n = x.shape
    programs, per_program = backward_programs(_layer_norm_bwd, x, rows)
    dx = torch.empty_like(x) if dx is None else dx
    partials = torch.empty((2, programs, n), device=x.device, dtype=torch.float32) if partials is None else partials
    if rows == 0:
        zero = torch.zeros_like(weight)
        return dx, zero, zero.clone()
    block, one_pass = row_block(n, ONE_PASS_MAX_BWD, block_n)
    args = (x, weight, dy, dx, mean, rstd, partials[0], partials[1], x.stride(0), dy.stride(0), dx.stride(0), rows,
            n, per_program)
    launch(_layer_norm_bwd, _layer_norm_bwd_tuned, (programs,), args, dict(BLOCK_N=block, ONE_PASS=one_pass))
    return dx, partials[0].sum(dim=0).to(weight.dtype), partials[1].sum(dim=0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        return cuda_ext.norm_forward(x, weight, bias, eps, rms=False)
    return layer_norm_forward(x, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, backend):
    rows = x.shape[0]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("megaengine::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        return cuda_ext.norm_backward(dy, x, weight, mean, rstd, rms=False)
    return layer_norm_backward(dy, x, weight, mean, rstd)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend):
        x2 = x.reshape(-1, x.shape[-1])
        y, mean, rstd = torch.ops.megaengine.layer_norm_fwd(x2, weight, bias, eps, backend)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # autograd may hand over an expanded (stride 0) gradient
        dx, dw, db = torch.ops.megaengine.layer_norm_bwd(dy2, x2, weight, mean, rstd, ctx.backend)
        return dx.view(dy.shape), dw, db if ctx.has_bias else None, None, None


def layer_norm_reference(x, weight, bias=None, eps=1e-5):
    """Plain torch LayerNorm, computed in fp32 (fp64 stays fp64) and returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def layer_norm(x, weight, bias=None, eps=1e-5, backend=None):
    """LayerNorm of x (..., hidden) over hidden. backend: "triton", "cuda" (the csrc extension), "torch" (the
    reference) or None (Triton on CUDA tensors, torch on CPU)."""
    backend = resolve_backend(backend, x, ("triton", "cuda", "torch"))
    if backend == "torch":
        return layer_norm_reference(x, weight, bias, eps)
    check_norm_args(x, weight, bias, "layer_norm")
    if backend == "cuda":
        cuda_ext.check_available(x)
    return LayerNorm.apply(x.contiguous(), weight.contiguous(),
                           None if bias is None else bias.contiguous(), float(eps), backend)

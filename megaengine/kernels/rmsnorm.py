"""RMSNorm over the last dimension: the Triton forward and backward kernels, the custom ops and autograd.Function
around them (Triton or the CUDA extension of megaengine.kernels.cuda), and the plain torch reference.

y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps). The forward saves rstd (fp32, one per row); the
backward computes dx in one pass over each row and leaves dweight as per-program partial sums, reduced once
at the end. Row sizes are handled as in layernorm.py (registers up to ONE_PASS_MAX, chunks beyond).
"""
import torch

from megaengine.kernels import cuda as cuda_ext
from megaengine.kernels._shared import (ONE_PASS_MAX, ONE_PASS_MAX_BWD, backward_programs, check_launchable,
                                       check_norm_args, launch, norm_configs, resolve_backend, row_block, tl,
                                       triton)


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
        y = x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        sum_sq = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            sum_sq += tl.sum(x * x, 0)
        rstd = tl.math.rsqrt(sum_sq / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(X, W, DY, DX, RSTD, DW_PART, stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                  BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(w*dy*xhat)) with xhat = x * rstd; program p also writes row p of the
    partial sums of dy*xhat (dweight) over its rows."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + r)
            xhat = x * rstd
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, 0) / N
            dx = (wdy - xhat * c1) * rstd
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_PART + part + cols, dw, mask=mask)
    else:
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            rstd = tl.load(RSTD + r)
            c1 = 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                c1 += tl.sum(x * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy, 0)
            c1 = c1 / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy - xhat * c1) * rstd
                tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # First row of the program starts the partial sums; see layernorm.py.
                keep = cols < N * (row > row_start).to(tl.int32)
                dw = tl.load(DW_PART + part + cols, mask=keep, other=0.0) + dy * xhat
                tl.store(DW_PART + part + cols, dw, mask=mask)
            tl.debug_barrier()


_rms_norm_fwd_tuned = triton.autotune(**norm_configs("fwd"))(_rms_norm_fwd)
_rms_norm_bwd_tuned = triton.autotune(**norm_configs("bwd"))(_rms_norm_bwd)


def rms_norm_forward(x, weight, eps, y=None, rstd=None, block_n=None):
    """Triton forward on 2-d x (rows, hidden): returns (y, rstd). Outputs may be given (tests pass NaN-filled
    ones); `block_n` forces the block width (tests use it to reach the chunked path)."""
    check_launchable(_rms_norm_fwd, x)
    rows, n = x.shape
    y = torch.empty_like(x) if y is None else y
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32) if rstd is None else rstd
    if rows == 0:
        return y, rstd
    block, one_pass = row_block(n, ONE_PASS_MAX, block_n)
    launch(_rms_norm_fwd, _rms_norm_fwd_tuned, (rows,), (x, weight, y, rstd, x.stride(0), y.stride(0), n, eps),
           dict(BLOCK_N=block, ONE_PASS=one_pass))
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, dx=None, partials=None, block_n=None):
    """Triton backward: returns (dx, dweight), dweight in weight's dtype. `partials` may be a given
    (programs, hidden) fp32 buffer."""
    check_launchable(_rms_norm_bwd, x)
    rows, n = x.shape
    programs, per_program = backward_programs(_rms_norm_bwd, x, rows)
    dx = torch.empty_like(x) if dx is None else dx
    partials = torch.empty((programs, n), device=x.device, dtype=torch.float32) if partials is None else partials
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block, one_pass = row_block(n, ONE_PASS_MAX_BWD, block_n)
    args = (x, weight, dy, dx, rstd, partials, x.stride(0), dy.stride(0), dx.stride(0), rows, n, per_program)
    launch(_rms_norm_bwd, _rms_norm_bwd_tuned, (programs,), args, dict(BLOCK_N=block, ONE_PASS=one_pass))
    return dx, partials.sum(dim=0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        y, _, rstd = cuda_ext.norm_forward(x, weight, None, eps, rms=True)
        return y, rstd
    return rms_norm_forward(x, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("megaengine::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        dx, dw, _ = cuda_ext.norm_backward(dy, x, weight, None, rstd, rms=True)
        return dx, dw
    return rms_norm_backward(dy, x, weight, rstd)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, backend):
    return torch.empty_like(x), torch.empty_like(weight)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        x2 = x.reshape(-1, x.shape[-1])
        y, rstd = torch.ops.megaengine.rms_norm_fwd(x2, weight, eps, backend)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.backend = backend
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # autograd may hand over an expanded (stride 0) gradient
        dx, dw = torch.ops.megaengine.rms_norm_bwd(dy2, x2, weight, rstd, ctx.backend)
        return dx.view(dy.shape), dw, None, None


def rms_norm_reference(x, weight, eps=1e-6):
    """Plain torch RMSNorm, computed in fp32 (fp64 stays fp64) and returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)).to(x.dtype)


def rms_norm(x, weight, eps=1e-6, backend=None):
    """RMSNorm of x (..., hidden) over hidden. backend: "triton", "cuda" (the csrc extension), "torch" (the
    reference) or None (Triton on CUDA tensors, torch on CPU)."""
    backend = resolve_backend(backend, x, ("triton", "cuda", "torch"))
    if backend == "torch":
        return rms_norm_reference(x, weight, eps)
    check_norm_args(x, weight, None, "rms_norm")
    if backend == "cuda":
        cuda_ext.check_available(x)
    return RMSNorm.apply(x.contiguous(), weight.contiguous(), float(eps), backend)

"""What LayerNorm and RMSNorm share: one Triton forward and one backward kernel over rows, with a constexpr RMS
(no mean, no bias), their launchers, the dispatch to the CUDA extension, and the autograd.Function.
layernorm.py and rmsnorm.py hold each norm's custom ops, torch reference and entry point.

The forward saves rstd (and, LayerNorm, mean; fp32, one per row). The backward computes dx in one pass over
each row and leaves dweight (and dbias) as per-program partial sums (one fp32 row per program), reduced once at
the end. Rows up to ONE_PASS_MAX (forward) / ONE_PASS_MAX_BWD (backward) elements are held in registers; longer
ones (64K and beyond) are walked in CHUNK-wide pieces.
"""
import torch

from megaengine.kernels import cuda as cuda_ext
from megaengine.kernels._shared import (ONE_PASS_MAX, ONE_PASS_MAX_BWD, backward_programs, check_launchable,
                                       check_norm_args, launch, norm_configs, row_block, tl, triton)


@triton.jit
def _affine(xhat, W, B, y_row, cols, mask, HAS_BIAS: tl.constexpr):
    """Store xhat * w (+ b) at y_row + cols."""
    y = xhat * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + cols, y.to(y_row.dtype.element_ty), mask=mask)


@triton.jit
def _chunked_stats(x_row, N, eps, RMS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mean, rstd) of a row walked in BLOCK_N-wide chunks. LayerNorm merges each chunk's own mean and
    squared deviations by Chan et al.'s pairwise update, so that a large mean does not cancel away the
    variance as it would in E[x^2] - E[x]^2; RMSNorm's mean stays 0 and its m2 is the sum of squares."""
    mean = 0.0
    m2 = 0.0
    count = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            m2 += tl.sum(x * x, 0)
        else:
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(x, 0) / n_b
            xc = tl.where(mask, x - mean_b, 0.0)
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + tl.sum(xc * xc, 0) + delta * delta * (count * n_b / total)
            count = total
    return mean, tl.math.rsqrt(m2 / N + eps)


@triton.jit
def _norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, N, eps,
              RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
    """y = (x - mean) * rstd * w (+ b), rstd = 1 / sqrt(mean((x - mean)^2) + eps); RMS: mean 0, no bias."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            xc = x
        else:
            mean = tl.sum(x, 0) / N
            xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, 0) / N + eps)
        _affine(xc * rstd, W, B, y_row, cols, mask, HAS_BIAS)
    else:
        mean, rstd = _chunked_stats(x_row, N, eps, RMS, BLOCK_N)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            _affine((x - mean) * rstd, W, B, y_row, cols, mask, HAS_BIAS)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _load_row(X, DY, r, stride_x, stride_dy, cols, mask):
    """x and dy of row r at cols, in their own dtype."""
    return tl.load(X + r * stride_x + cols, mask=mask, other=0.0), tl.load(DY + r * stride_dy + cols, mask=mask,
                                                                           other=0.0)


@triton.jit
def _row_terms(x, dy, mask, mean, rstd):
    """(dy, xhat) in fp32; xhat is 0 outside the row."""
    return dy.to(tl.float32), tl.where(mask, (x.to(tl.float32) - mean) * rstd, 0.0)


@triton.jit
def _dx(wdy, xhat, c1, c2, rstd, RMS: tl.constexpr):
    if RMS:
        dx = (wdy - xhat * c1) * rstd
    else:
        dx = (wdy - (xhat * c1 + c2)) * rstd
    return dx


@triton.jit
def _norm_bwd(X, W, DY, DX, MEAN, RSTD, PARTIALS, stride_x, stride_dy, stride_dx, M, N, rows_per_program,
              RMS: tl.constexpr, BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr, PREFETCH: tl.constexpr = False):
    """dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)), without the last term for RMSNorm; program p
    also writes row p of the partial sums of dy*xhat (dweight) and, LayerNorm, dy (dbias) over its rows:
    PARTIALS is (1 or 2, programs, N), dweight's rows first.

    A program walks its rows one after the other, and each row's loads wait for the previous row's two block
    reductions: one row in flight per program. PREFETCH (one-pass rows) issues the next row's loads before
    this row's reductions, two rows in flight, at the cost of the registers that hold them; the autotuner
    picks."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw_part = PARTIALS + pid.to(tl.int64) * N
    db_part = dw_part + tl.num_programs(0).to(tl.int64) * N
    if ONE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            # (a scalar-and-block `&` breaks the interpreter, hence the products in these masks)
            x_next, dy_next = _load_row(X, DY, tl.cast(row_start, tl.int64), stride_x, stride_dy, cols,
                                        cols < N * (row_start < row_end).to(tl.int32))
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            if PREFETCH:
                x_raw, dy_raw = x_next, dy_next
                x_next, dy_next = _load_row(X, DY, r + 1, stride_x, stride_dy, cols,
                                            cols < N * (row + 1 < row_end).to(tl.int32))
            else:
                x_raw, dy_raw = _load_row(X, DY, r, stride_x, stride_dy, cols, mask)
            mean = 0.0 if RMS else tl.load(MEAN + r)
            rstd = tl.load(RSTD + r)
            dy, xhat = _row_terms(x_raw, dy_raw, mask, mean, rstd)
            wdy = w * dy
            c2 = 0.0
            if not RMS:
                c2 = tl.sum(wdy, 0) / N
                db += dy
            dx = _dx(wdy, xhat, tl.sum(xhat * wdy, 0) / N, c2, rstd, RMS)
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(dw_part + cols, dw, mask=mask)
        if not RMS:
            tl.store(db_part + cols, db, mask=mask)
    else:
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)  # a plain int under the interpreter
            mean = 0.0 if RMS else tl.load(MEAN + r)
            rstd = tl.load(RSTD + r)
            # Two walks over the row: the sums c1 and c2 first, then dx and the partial sums.
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x_raw, dy_raw = _load_row(X, DY, r, stride_x, stride_dy, cols, mask)
                dy, xhat = _row_terms(x_raw, dy_raw, mask, mean, rstd)
                wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                c1 += tl.sum(xhat * wdy, 0)
                if not RMS:
                    c2 += tl.sum(wdy, 0)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x_raw, dy_raw = _load_row(X, DY, r, stride_x, stride_dy, cols, mask)
                dy, xhat = _row_terms(x_raw, dy_raw, mask, mean, rstd)
                dx = _dx(tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy, xhat, c1 / N, c2 / N, rstd,
                         RMS)
                tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # The program's first row starts its partial sums (so the buffer needs no zeroing and a
                # re-run by the autotuner does not double them); later rows add to them.
                # (a scalar-and-block `&` breaks the interpreter, hence the product)
                keep = cols < N * (row > row_start).to(tl.int32)
                dw = tl.load(dw_part + cols, mask=keep, other=0.0) + dy * xhat
                tl.store(dw_part + cols, dw, mask=mask)
                if not RMS:
                    db = tl.load(db_part + cols, mask=keep, other=0.0) + dy
                    tl.store(db_part + cols, db, mask=mask)
            tl.debug_barrier()


# One autotuner per norm: each keeps its own cache of the best config per row width.
TUNED = {(kind, rms): triton.autotune(**norm_configs(kind))(kernel)
         for kind, kernel in (("fwd", _norm_fwd), ("bwd", _norm_bwd)) for rms in (False, True)}


def norm_forward(x, weight, bias, eps, rms, y=None, mean=None, rstd=None, block_n=None):
    """Triton forward on 2-d x (rows, hidden): (y, mean, rstd), mean None for RMSNorm. Outputs may be given
    (tests pass NaN-filled ones); `block_n` forces the block width (tests use it to reach the chunked path)."""
    check_launchable(_norm_fwd, x)
    rows, n = x.shape
    y = torch.empty_like(x) if y is None else y
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32) if rstd is None else rstd
    if not rms and mean is None:
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, mean, rstd
    block, one_pass = row_block(n, ONE_PASS_MAX, block_n)
    # Unused pointers (RMSNorm's mean, a missing bias) are given a real tensor the kernel never touches.
    args = (x, weight, weight if bias is None else bias, y, rstd if rms else mean, rstd, x.stride(0), y.stride(0),
            n, eps)
    meta = dict(RMS=rms, HAS_BIAS=bias is not None, BLOCK_N=block, ONE_PASS=one_pass)
    key = (n, block, x.dtype, weight.dtype, None if bias is None else bias.dtype, x.device)
    launch(_norm_fwd, TUNED[("fwd", rms)], (rows,), args, meta, key)
    return y, mean, rstd


def norm_backward(dy, x, weight, mean, rstd, rms, dx=None, partials=None, block_n=None, config=None):
    """Triton backward: (dx, dweight, dbias), dweight and dbias in weight's dtype, dbias None for RMSNorm.
    `partials` may be a given (1 for RMSNorm else 2, programs, hidden) fp32 buffer, as the outputs may in
    norm_forward; `config` (a triton.Config of the autotuner's list) is launched instead of the tuned one."""
    check_launchable(_norm_bwd, x)
    rows, n = x.shape
    programs, per_program = backward_programs(_norm_bwd, x, rows)
    dx = torch.empty_like(x) if dx is None else dx
    if partials is None:
        partials = torch.empty((1 if rms else 2, programs, n), device=x.device, dtype=torch.float32)
    if rows == 0:
        zero = torch.zeros_like(weight)
        return dx, zero, None if rms else zero.clone()
    block, one_pass = row_block(n, ONE_PASS_MAX_BWD, block_n)
    args = (x, weight, dy, dx, rstd if rms else mean, rstd, partials, x.stride(0), dy.stride(0), dx.stride(0), rows,
            n, per_program)
    key = (n, block, x.dtype, dy.dtype, weight.dtype, x.device)
    launch(_norm_bwd, TUNED[("bwd", rms)], (programs,), args, dict(RMS=rms, BLOCK_N=block, ONE_PASS=one_pass), key,
           config)
    # One reduction over the programs for dweight and dbias together; each is cast (or copied) on its own, so
    # that the two do not share storage.
    if rms:
        return dx, partials.sum(dim=(0, 1)).to(weight.dtype), None
    dw, db = (s.to(weight.dtype, copy=True) for s in partials.sum(dim=1).unbind())
    return dx, dw, db


def forward(backend, x, weight, bias, eps, rms):
    """(y, mean, rstd) from the CUDA extension (backend "cuda") or Triton."""
    return (cuda_ext.norm_forward if backend == "cuda" else norm_forward)(x, weight, bias, eps, rms)


def backward(backend, dy, x, weight, mean, rstd, rms):
    """(dx, dweight, dbias) from the CUDA extension (backend "cuda") or Triton."""
    return (cuda_ext.norm_backward if backend == "cuda" else norm_backward)(dy, x, weight, mean, rstd, rms)


def _traced_forward(backend, x2, weight, bias, eps, rms):
    """forward() through the custom ops of layernorm.py / rmsnorm.py, which keep it opaque to torch.compile."""
    if rms:
        y, rstd = torch.ops.megaengine.rms_norm_fwd(x2, weight, eps, backend)
        return y, None, rstd
    return torch.ops.megaengine.layer_norm_fwd(x2, weight, bias, eps, backend)


def _traced_backward(backend, dy2, x2, weight, mean, rstd, rms):
    if rms:
        dx, dw = torch.ops.megaengine.rms_norm_bwd(dy2, x2, weight, rstd, backend)
        return dx, dw, None
    return torch.ops.megaengine.layer_norm_bwd(dy2, x2, weight, mean, rstd, backend)


class RowNorm(torch.autograd.Function):
    """LayerNorm or (rms) RMSNorm over the last dim. While torch.compile traces, the kernels go through the
    custom ops (opaque to it); in eager mode they are called directly, since the custom ops' dispatch (schema
    parsing, alias checks, a dynamo guard) is host time on every call and a norm's kernels are short."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend, rms):
        x2 = x.reshape(-1, x.shape[-1])
        run = _traced_forward if torch.compiler.is_compiling() else forward
        y, mean, rstd = run(backend, x2, weight, bias, eps, rms)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.backend, ctx.rms, ctx.has_bias = backend, rms, bias is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # autograd may hand over an expanded (stride 0) gradient
        run = _traced_backward if torch.compiler.is_compiling() else backward
        dx, dw, db = run(ctx.backend, dy2, x2, weight, mean, rstd, ctx.rms)
        return dx.view(dy.shape), dw, db if ctx.has_bias else None, None, None, None


def apply(x, weight, bias, eps, backend, rms, name):
    """The norm through RowNorm after the argument checks; `name` is the public function's, for messages."""
    check_norm_args(x, weight, bias, name)
    if backend == "cuda":
        cuda_ext.check_available(x)
    return RowNorm.apply(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                         float(eps), backend, rms)

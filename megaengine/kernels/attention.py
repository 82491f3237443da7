"""Flash attention: the Triton forward and backward kernels, the custom ops and autograd.Function around them,
and the plain torch reference used on CPU and in tests.

Layout: q (batch, heads, seq_q, head_dim); k and v (batch, kv_heads, seq_k, head_dim) with kv_heads dividing
heads (grouped-query and multi-query attention). The forward keeps the log-sum-exp of each query row (natural
log, fp32); the backward recomputes the probabilities tile by tile from it, so no seq x seq matrix is ever
stored. Causal masking is top-left aligned (query i sees keys 0..i), as in torch's `is_causal`.
"""
import math

import torch

from megaengine.kernels._shared import (cdiv, check_launchable, interpreted, on_device, prune_by_arch,
                                       resolve_backend, tl, triton)

HEAD_DIMS = (16, 32, 64, 128, 256)
LOG2E = 1.4426950408889634

# Block sizes under the interpreter (no autotuning there); unequal on purpose so that the loop bounds of the
# causal diagonal are exercised with BLOCK_M > BLOCK_N in one kernel and BLOCK_M < BLOCK_N in the other.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bfloat16 as raw uint16 bits; upcasting the already-rounded operands gives the
    # same products a tensor core would.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n, offs_m,
              offs_n, offs_d, seq_k, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
    s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION) * scale_log2
    if MASKED:
        valid = cols[None, :] < seq_k
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _key_ranges(m0, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks [0, full_end) need no mask for query rows m0..m0+BLOCK_M; [full_end, hi) do."""
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, seq_k)
        full_end = (tl.minimum(m0 + 1, seq_k) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_k
        full_end = (seq_k // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, scale_log2,
              stride_qb, stride_qh, stride_qs, stride_qd,
              stride_kb, stride_kh, stride_ks, stride_kd,
              stride_vb, stride_vh, stride_vs, stride_vd,
              stride_ob, stride_oh, stride_os, stride_od,
              heads, group, seq_q, seq_k,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows first, for a better tail of the launch
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    hk = h // group
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_q
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = _key_ranges(m0, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  start_n, offs_m, offs_n, offs_d, seq_k, scale_log2,
                                  BLOCK_M, BLOCK_N, CAUSAL, False, UPCAST, PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  start_n, offs_m, offs_n, offs_d, seq_k, scale_log2,
                                  BLOCK_M, BLOCK_N, CAUSAL, True, UPCAST, PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=row_ok)
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_os, stride_od,
                    stride_gb, stride_gh, stride_gs, stride_gd,
                    heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, heads, stride_qb, stride_qh, stride_qs, stride_qd,
               stride_gb, stride_gh, stride_gs, stride_gd, start_m, cols, offs_m, offs_d, seq_q, scale_log2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_M query rows of head h against this program's keys, transposed (keys along dim 0): adds
    p^T dO to dv and ds^T q to dk, with ds = p * (dO v^T - delta)."""
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_gb + h * stride_gh
    lse_base = LSE + (b * heads + h) * seq_q
    delta_base = DELTA + (b * heads + h) * seq_q
    rows = start_m + offs_m
    qt_ptrs = q_base + rows[None, :] * stride_qs + offs_d[:, None] * stride_qd
    do_ptrs = do_base + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd
    if MASKED:
        qt = tl.load(qt_ptrs, mask=rows[None, :] < seq_q, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < seq_q, other=0.0)
        lse = tl.load(lse_base + rows, mask=rows < seq_q, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
    else:
        qt = tl.load(qt_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    st = _dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
    pt = tl.math.exp2(st * scale_log2 - lse[None, :] * 1.4426950408889634)
    if MASKED:
        valid = rows[None, :] < seq_q
        if CAUSAL:
            valid = valid & (rows[None, :] >= cols[:, None])
        pt = tl.where(valid, pt, 0.0)
    dv = _dot(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
    dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, scale, scale_log2,
                   stride_qb, stride_qh, stride_qs, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_gb, stride_gh, stride_gs, stride_gd,
                   stride_dkb, stride_dkh, stride_dks, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                   heads, kv_heads, group, seq_q, seq_k,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program owns BLOCK_N keys of one kv head and sums over the query heads of its group, so grouped
    heads need neither atomics nor a reduction afterwards."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    hk = (pid_bh % kv_heads).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols[:, None] < seq_k
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks [lo, mid) straddle the causal diagonal, [mid, full_end) are whole and below it, and
    # [max(mid, full_end), q_end) is the ragged last block.
    q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    full_end = (seq_q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, q_end)
    else:
        lo = 0
        mid = 0
    # Each region's loop walks its query blocks for every head of the group in turn, flattened: a loop over
    # the group around three inner loops makes the compiler spill registers.
    n_diag = (mid - lo) // BLOCK_M
    n_full = tl.maximum(full_end - mid, 0) // BLOCK_M
    tail = tl.maximum(mid, full_end)
    n_tail = (q_end - tail) // BLOCK_M
    for it in range(0, group * n_diag):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, b, hk * group + it // n_diag, heads, stride_qb,
                            stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
                            lo + (it % n_diag) * BLOCK_M, cols, offs_m, offs_d, seq_q, scale_log2,
                            BLOCK_M, BLOCK_N, CAUSAL, True, UPCAST, PRECISION)
    for it in range(0, group * n_full):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, b, hk * group + it // n_full, heads, stride_qb,
                            stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
                            mid + (it % n_full) * BLOCK_M, cols, offs_m, offs_d, seq_q, scale_log2,
                            BLOCK_M, BLOCK_N, CAUSAL, False, UPCAST, PRECISION)
    for it in range(0, group * n_tail):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, b, hk * group + it // n_tail, heads, stride_qb,
                            stride_qh, stride_qs, stride_qd, stride_gb, stride_gh, stride_gs, stride_gd,
                            tail + (it % n_tail) * BLOCK_M, cols, offs_m, offs_d, seq_q, scale_log2,
                            BLOCK_M, BLOCK_N, CAUSAL, True, UPCAST, PRECISION)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n, offs_m,
             offs_n, offs_d, seq_k, scale_log2,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = start_n + offs_n
    kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd
    vt_ptrs = v_base + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
        vt = tl.load(vt_ptrs, mask=cols[None, :] < seq_k, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
    p = tl.math.exp2(s * scale_log2 - lse[:, None])
    if MASKED:
        valid = cols[None, :] < seq_k
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        p = tl.where(valid, p, 0.0)
    dp = _dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, scale_log2,
                 stride_qb, stride_qh, stride_qs, stride_qd,
                 stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_vb, stride_vh, stride_vs, stride_vd,
                 stride_gb, stride_gh, stride_gs, stride_gd,
                 stride_dqb, stride_dqh, stride_dqs, stride_dqd,
                 heads, group, seq_q, seq_k,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    hk = h // group
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = _key_ranges(m0, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n,
                      offs_m, offs_n, offs_d, seq_k, scale_log2, BLOCK_M, BLOCK_N, CAUSAL, False, UPCAST,
                      PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n,
                      offs_m, offs_n, offs_d, seq_k, scale_log2, BLOCK_M, BLOCK_N, CAUSAL, True, UPCAST,
                      PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Autotuning (CUDA only; the interpreter runs INTERPRET_BLOCKS)
# ----------------------------------------------------------------------------------------------------------

def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by GPU generation and head dim (16 and 32 use the 64 lists); the
# backward keeps the iterated-over dimension small (BLOCK_M for dk/dv, BLOCK_N for dq), as FlashAttention-2
# does. fp32 inputs get small tiles on every GPU: their "ieee" dots run on FMA units, and larger tiles spill
# registers and take tens of seconds each to compile. tests/kernels/test_triton_compile.py compiles every
# entry for sm_80 / sm_90 (no GPU needed) and checks that it fits in shared memory and spills no registers;
# which one is fastest is left to the autotuner.
_FWD = {
    "hopper": {64: _configs([(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]),
               128: _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)]),
               256: _configs([(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 1)])},
    "ampere": {64: _configs([(128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3)]),
               128: _configs([(128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3)]),
               256: _configs([(64, 64, 8, 2), (64, 32, 8, 2)])},
    "fp32": {64: _configs([(32, 32, 8, 1), (32, 16, 8, 1)]),
             128: _configs([(32, 16, 8, 1), (16, 32, 8, 1)]),
             256: _configs([(16, 32, 8, 1), (32, 16, 8, 1)])},
}
_DKDV = {
    "hopper": {64: _configs([(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)]),
               128: _configs([(32, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 3), (16, 64, 8, 3)]),
               256: _configs([(32, 32, 8, 2), (16, 32, 8, 2)])},
    "ampere": {64: _configs([(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)]),
               128: _configs([(32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 8, 2)]),
               256: _configs([(32, 32, 8, 2), (16, 32, 4, 2)])},
    "fp32": {64: _configs([(16, 16, 8, 1), (32, 32, 8, 1)]),
             128: _configs([(32, 16, 8, 1), (16, 32, 8, 1)]),
             256: _configs([(16, 16, 8, 1)])},
}
_DQ = {
    "hopper": {64: _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)]),
               128: _configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3)]),
               256: _configs([(64, 32, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2)])},
    "ampere": {64: _configs([(128, 32, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3), (64, 16, 4, 3)]),
               128: _configs([(64, 32, 8, 2), (64, 32, 4, 2), (128, 16, 8, 2), (64, 16, 4, 2)]),
               256: _configs([(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2)])},
    "fp32": {64: _configs([(32, 32, 8, 1), (16, 16, 8, 1)]),
             128: _configs([(32, 32, 8, 1), (16, 32, 8, 1)]),
             256: _configs([(16, 32, 8, 1), (32, 16, 8, 1)])},
}


def _pick(table):
    def pick(major, args):
        """The configs for this GPU generation (Hopper is major 9), input dtype and head dim."""
        by_dim = table["fp32" if args["Q"].dtype == torch.float32 else "hopper" if major >= 9 else "ampere"]
        return by_dim[64 if args["HEAD_DIM"] <= 64 else args["HEAD_DIM"]]
    return pick


def _all(table):
    return [c for by_dim in table.values() for cs in by_dim.values() for c in cs]


# Which configs each autotuned kernel may try, as pick(major, args); the compile test reads this too.
PICKS = {"_attn_fwd": _pick(_FWD), "_attn_bwd_dkdv": _pick(_DKDV), "_attn_bwd_dq": _pick(_DQ)}


def _tuned(kernel, table, pick):
    return triton.autotune(_all(table), key=["seq_q", "seq_k", "HEAD_DIM", "CAUSAL"],
                           prune_configs_by={"early_config_prune": prune_by_arch(pick)})(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd, _FWD, PICKS["_attn_fwd"])
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, _DKDV, PICKS["_attn_bwd_dkdv"])
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, _DQ, PICKS["_attn_bwd_dq"])


# ----------------------------------------------------------------------------------------------------------
# Launchers (plain functions; the custom ops below call them)
# ----------------------------------------------------------------------------------------------------------

def _check_shapes(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention wants 4-d (batch, heads, seq, head_dim) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and q {tuple(q.shape)} "
                         "in batch and head_dim")
    if heads % k.shape[1] != 0:
        raise ValueError(f"kv heads ({k.shape[1]}) must divide query heads ({heads})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("flash_attention needs at least one query and one key")


def _precision(q):
    """fp32 inputs get full-precision dots: tf32 would fail an fp32 parity test."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _blocks(kernel, name, blocks):
    if blocks is not None:
        return blocks[name]
    return INTERPRET_BLOCKS[name] if interpreted(kernel) else None


def _launch(kernel, tuned, name, grid_of, args, meta, blocks):
    """Run `kernel` with fixed blocks (interpreter or tests) or its autotuned wrapper (CUDA)."""
    fixed = _blocks(kernel, name, blocks)
    with on_device(args[0]):
        if fixed is None:
            tuned[lambda m: grid_of(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)
        else:
            block_m, block_n = fixed
            kernel[grid_of(block_m, block_n)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)


def _strides(t):
    return tuple(t.stride())


def attention_forward(q, k, v, causal=True, softmax_scale=None, out=None, lse=None, blocks=None):
    """Triton forward: returns (out, lse) with lse (batch, heads, seq_q) fp32 in natural log. `out` and `lse`
    may be given (tests pass NaN-filled ones); `blocks` maps "fwd" to (BLOCK_M, BLOCK_N) to skip tuning."""
    _check_shapes(q, k, v)
    check_launchable(_attn_fwd, q)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((batch, heads, seq_q), device=q.device, dtype=torch.float32) if lse is None else lse
    meta = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), PRECISION=_precision(q),
                UPCAST=interpreted(_attn_fwd) and q.dtype == torch.bfloat16)
    args = (q, k, v, out, lse, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, heads // kv_heads, seq_q, seq_k)
    _launch(_attn_fwd, _attn_fwd_tuned, "fwd", lambda bm, bn: (cdiv(seq_q, bm), batch * heads), args, meta,
            blocks)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, causal=True, softmax_scale=None, dq=None, dk=None, dv=None,
                       delta=None, blocks=None):
    """Triton backward: returns (dq, dk, dv). Buffers may be given, as in attention_forward; `blocks` maps
    "dkdv" and "dq" to (BLOCK_M, BLOCK_N)."""
    check_launchable(_attn_bwd_dq, q)
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    delta = torch.empty_like(lse) if delta is None else delta
    meta = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), PRECISION=_precision(q),
                UPCAST=interpreted(_attn_bwd_dq) and q.dtype == torch.bfloat16)
    block = 64 if head_dim <= 128 else 32
    with on_device(q):
        _attn_bwd_delta[(cdiv(seq_q, block), batch * heads)](
            out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seq_q, HEAD_DIM=head_dim,
            BLOCK_M=block)
    common = (q, k, v, grad_out, lse, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, "dkdv", lambda bm, bn: (cdiv(seq_k, bn), batch * kv_heads),
            (*common, dk, dv, scale, scale * LOG2E, *strides, *_strides(dk), *_strides(dv),
             heads, kv_heads, group, seq_q, seq_k), meta, blocks)
    _launch(_attn_bwd_dq, _attn_bwd_dq_tuned, "dq", lambda bm, bn: (cdiv(seq_q, bm), batch * heads),
            (*common, dq, scale, scale * LOG2E, *strides, *_strides(dq), heads, group, seq_q, seq_k), meta,
            blocks)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd.Function
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, softmax_scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megaengine::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool,
                    softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, causal, softmax_scale)


@_flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        out, lse = torch.ops.megaengine.flash_attn_fwd(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.megaengine.flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------------
# Reference and entry point
# ----------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, causal=True, softmax_scale=None, return_lse=False):
    """Plain torch attention, computed in fp32 (fp64 stays fp64) and returned in q's dtype."""
    _check_shapes(q, k, v)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k = k.to(compute).repeat_interleave(heads // kv_heads, dim=1)
    v = v.to(compute).repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q.to(compute), k.transpose(-1, -2)) * scale
    if causal:
        seq_q, seq_k = q.shape[2], k.shape[2]
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v).to(q.dtype)
    return (out, lse) if return_lse else out


def check_triton_inputs(q, k, v) -> None:
    """Raise ValueError for shapes, head dims or dtypes the Triton kernels do not take."""
    _check_shapes(q, k, v)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"Triton flash_attention supports head_dim in {HEAD_DIMS}, got {q.shape[-1]}; "
                         "use backend='torch' for other sizes")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"Triton flash_attention supports fp16, bf16 and fp32, got {q.dtype}")


def flash_attention(q, k, v, causal=True, softmax_scale=None, backend=None):
    """softmax(q k^T * scale [+ causal mask]) v for q (batch, heads, seq, head_dim) and k, v with kv heads
    dividing heads. backend: "triton", "torch" (the reference) or None (Triton on CUDA, torch on CPU)."""
    backend = resolve_backend(backend, q, ("triton", "torch"))
    if backend == "torch":
        return attention_reference(q, k, v, causal, softmax_scale)
    check_triton_inputs(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttention.apply(q, k, v, bool(causal), float(scale))

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
                                       resolve_backend, tl, triton, upcast_dot)

HEAD_DIMS = (16, 32, 64, 128, 256)
LOG2E = 1.4426950408889634  # the kernels work in base 2: exp2 is one instruction
_LOG2E = tl.constexpr(LOG2E)

# Block sizes under the interpreter (no autotuning there); unequal on purpose so that the loop bounds of the
# causal diagonal are exercised with BLOCK_M > BLOCK_N in one kernel and BLOCK_M < BLOCK_N in the other.
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Each pass has one inner loop (_fwd_inner, _dkdv_inner, _dq_inner) that walks its blocks
# region by region in a tl.static_range: the constexpr MASKED compiles bounds checks and the causal mask into
# the regions that need them (the diagonal, the ragged end) only, as the STAGE of Triton's fused-attention
# tutorial does.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _load(ptrs, ok, MASKED: tl.constexpr):
    """A tile; with MASKED, the elements outside `ok` read as 0 (a block that may run past the end)."""
    if MASKED:
        tile = tl.load(ptrs, mask=ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _mask(s, walked, bound, q_idx, k_idx, fill, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """With MASKED, `fill` where the walked index reaches its bound or (causal) the key follows the query."""
    if MASKED:
        valid = walked < bound
        if CAUSAL:
            valid = valid & (q_idx >= k_idx)
        s = tl.where(valid, s, fill)
    return s


@triton.jit
def _head(base, b, h, stride_b, stride_h):
    """Pointer to head h of batch b."""
    return base + b * stride_b + h * stride_h


@triton.jit
def _load_rows(head, stride_s, stride_d, offs_s, offs_d, seq):
    """Rows offs_s of one head; those at or past `seq` read as 0."""
    return tl.load(head + offs_s[:, None] * stride_s + offs_d[None, :] * stride_d, mask=offs_s[:, None] < seq,
                   other=0.0)


@triton.jit
def _store_rows(head, stride_s, stride_d, offs_s, offs_d, seq, value):
    """Rows offs_s below `seq` of one head, in its dtype."""
    tl.store(head + offs_s[:, None] * stride_s + offs_d[None, :] * stride_d, value.to(head.dtype.element_ty),
             mask=offs_s[:, None] < seq)


@triton.jit
def _program_block(heads, group, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, REVERSED: tl.constexpr):
    """(batch, head, kv head, first row, row offsets, head-dim offsets) of a program over BLOCK rows of one
    head; REVERSED hands the last rows to the first programs (causal launches: the longest rows first, for a
    better tail)."""
    pid = tl.program_id(0)
    if REVERSED:
        pid = tl.num_programs(0) - 1 - pid
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    start = pid * BLOCK
    return b, h, h // group, start, start + tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)


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
def _fwd_inner(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, m0, offs_m, offs_d, seq_k,
               scale_log2, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of BLOCK_M query rows over their keys, in base 2: (unnormalised out, row sums, row
    maxima). Key blocks [0, full_end) run unmasked (MASKED 0), [full_end, hi) masked (MASKED 1)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = _key_ranges(m0, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):
        for start_n in range(full_end if MASKED else 0, hi if MASKED else full_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
            kt = _load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, cols[None, :] < seq_k, MASKED)
            s = upcast_dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION) * scale_log2
            s = _mask(s, cols[None, :], seq_k, offs_m[:, None], cols[None, :], float("-inf"), CAUSAL, MASKED)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(v_ptrs, cols[:, None] < seq_k, MASKED)
            acc = upcast_dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, scale_log2, heads, group, seq_q, seq_k,
              stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
              stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    b, h, hk, m0, offs_m, offs_d = _program_block(heads, group, HEAD_DIM, BLOCK_M, CAUSAL)
    q_head = _head(Q, b, h, stride_qb, stride_qh)
    k_head = _head(K, b, hk, stride_kb, stride_kh)
    v_head = _head(V, b, hk, stride_vb, stride_vh)
    o_head = _head(O, b, h, stride_ob, stride_oh)
    q = _load_rows(q_head, stride_qs, stride_qd, offs_m, offs_d, seq_q)
    acc, l_i, m_i = _fwd_inner(q, k_head, v_head, stride_ks, stride_kd, stride_vs, stride_vd, m0, offs_m, offs_d,
                               seq_k, scale_log2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, UPCAST, PRECISION)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / _LOG2E
    _store_rows(o_head, stride_os, stride_od, offs_m, offs_d, seq_q, acc)
    tl.store(LSE + tl.program_id(1).to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_os, stride_od, stride_gb, stride_gh, stride_gs, stride_gd,
                    heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
    b, h, _, _, offs_m, offs_d = _program_block(heads, 1, HEAD_DIM, BLOCK_M, False)
    o = _load_rows(_head(O, b, h, stride_ob, stride_oh), stride_os, stride_od, offs_m, offs_d, seq_q)
    do = _load_rows(_head(DO, b, h, stride_gb, stride_gh), stride_gs, stride_gd, offs_m, offs_d, seq_q)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_inner(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, hk, heads, group, stride_qb, stride_qh, stride_qs, stride_qd,
                stride_gb, stride_gh, stride_gs, stride_gd, n0, cols, offs_d, seq_q, scale_log2,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """(dk / scale, dv) of keys `cols` of kv head hk, summed over the query heads of its group; keys run along
    dim 0 (transposed tiles): dv += p^T dO, dk += ds^T q with ds = p * (dO v^T - delta). ATOMIC_DQ also adds
    ds k (dq / scale) into the fp32 DQ_ACC (contiguous, q's shape) with atomics, as FlashAttention-2 does, so
    that no dq pass recomputes p and dO v^T: 5 tile products per block pair instead of 7.

    Query blocks [lo, mid) straddle the causal diagonal (REGION 0, masked), [mid, tail) are whole and below
    it (REGION 1) and [tail, q_end) is the ragged last block (REGION 2, masked). Each region's loop walks its
    blocks for every head of the group in turn, flattened: a loop over the group around the region loops makes
    the compiler spill registers."""
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, q_end)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, (seq_q // BLOCK_M) * BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    for REGION in tl.static_range(0 if CAUSAL else 1, 3):
        start = lo if REGION == 0 else (mid if REGION == 1 else tail)
        n = ((mid if REGION == 0 else (tail if REGION == 1 else q_end)) - start) // BLOCK_M
        for it in range(0, group * n):
            h = hk * group + it // n
            rows = start + (it % n) * BLOCK_M + offs_m
            stats = (b * heads + h) * seq_q + rows
            qt = _load(_head(Q, b, h, stride_qb, stride_qh) + rows[None, :] * stride_qs + offs_d[:, None] * stride_qd,
                       rows[None, :] < seq_q, REGION != 1)
            do = _load(_head(DO, b, h, stride_gb, stride_gh) + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                       rows[:, None] < seq_q, REGION != 1)
            lse = _load(LSE + stats, rows < seq_q, REGION != 1)
            delta = _load(DELTA + stats, rows < seq_q, REGION != 1)
            st = upcast_dot(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
            pt = tl.math.exp2(st * scale_log2 - lse[None, :] * _LOG2E)
            pt = _mask(pt, rows[None, :], seq_q, rows[None, :], cols[:, None], 0.0, CAUSAL, REGION != 1)
            dv = upcast_dot(pt.to(do.dtype), do, dv, UPCAST, PRECISION)
            dpt = upcast_dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
            dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
            dk = upcast_dot(dst, tl.trans(qt), dk, UPCAST, PRECISION)
            if ATOMIC_DQ:
                dq = upcast_dot(tl.trans(dst), k, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), UPCAST, PRECISION)
                dq_ptrs = DQ_ACC + stats[:, None] * HEAD_DIM + offs_d[None, :]
                if REGION != 1:
                    tl.atomic_add(dq_ptrs, dq, mask=rows[:, None] < seq_q, sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, scale, scale_log2, heads, kv_heads, group, seq_q,
                   seq_k, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, stride_gb, stride_gh, stride_gs, stride_gd,
                   stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr = False):
    """One program owns BLOCK_N keys of one kv head and sums over the query heads of its group, so grouped
    heads need neither atomics nor a reduction afterwards for dk and dv; with ATOMIC_DQ it also adds dq into
    DQ_ACC (else DQ_ACC is unused and _attn_bwd_dq computes dq)."""
    b, hk, _, n0, cols, offs_d = _program_block(kv_heads, 1, HEAD_DIM, BLOCK_N, False)
    dk_head = _head(DK, b, hk, stride_dkb, stride_dkh)
    dv_head = _head(DV, b, hk, stride_dvb, stride_dvh)
    k = _load_rows(_head(K, b, hk, stride_kb, stride_kh), stride_ks, stride_kd, cols, offs_d, seq_k)
    v = _load_rows(_head(V, b, hk, stride_vb, stride_vh), stride_vs, stride_vd, cols, offs_d, seq_k)
    dk, dv = _dkdv_inner(k, v, Q, DO, LSE, DELTA, DQ_ACC, b, hk, heads, group, stride_qb, stride_qh, stride_qs,
                         stride_qd, stride_gb, stride_gh, stride_gs, stride_gd, n0, cols, offs_d, seq_q, scale_log2,
                         HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, UPCAST, PRECISION, ATOMIC_DQ)
    _store_rows(dk_head, stride_dks, stride_dkd, cols, offs_d, seq_k, dk * scale)
    _store_rows(dv_head, stride_dvs, stride_dvd, cols, offs_d, seq_k, dv)


@triton.jit
def _dq_inner(q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, m0, offs_m, offs_d,
              seq_k, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq / scale of BLOCK_M query rows, the sum over their key blocks of ds k with ds = p * (dO v^T - delta);
    regions as in _fwd_inner. `lse` is in base 2."""
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = _key_ranges(m0, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    for MASKED in tl.static_range(2):
        for start_n in range(full_end if MASKED else 0, hi if MASKED else full_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            key_ok = cols[None, :] < seq_k
            kt = _load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, key_ok, MASKED)
            vt = _load(v_base + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd, key_ok, MASKED)
            s = upcast_dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
            p = tl.math.exp2(s * scale_log2 - lse[:, None])
            p = _mask(p, cols[None, :], seq_k, offs_m[:, None], cols[None, :], 0.0, CAUSAL, MASKED)
            dp = upcast_dot(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
            dq = upcast_dot((p * (dp - delta[:, None])).to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, scale, scale_log2, heads, group, seq_q, seq_k,
                 stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_vb, stride_vh, stride_vs, stride_vd, stride_gb, stride_gh, stride_gs, stride_gd,
                 stride_dqb, stride_dqh, stride_dqs, stride_dqd,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    b, h, hk, m0, offs_m, offs_d = _program_block(heads, group, HEAD_DIM, BLOCK_M, CAUSAL)
    dq_head = _head(DQ, b, h, stride_dqb, stride_dqh)
    stats = tl.program_id(1).to(tl.int64) * seq_q + offs_m
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh), stride_qs, stride_qd, offs_m, offs_d, seq_q)
    do = _load_rows(_head(DO, b, h, stride_gb, stride_gh), stride_gs, stride_gd, offs_m, offs_d, seq_q)
    lse = tl.load(LSE + stats, mask=offs_m < seq_q, other=0.0) * _LOG2E
    delta = tl.load(DELTA + stats, mask=offs_m < seq_q, other=0.0)
    dq = _dq_inner(q, do, lse, delta, _head(K, b, hk, stride_kb, stride_kh), _head(V, b, hk, stride_vb, stride_vh),
                   stride_ks, stride_kd, stride_vs, stride_vd, m0, offs_m, offs_d, seq_k, scale_log2,
                   HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, UPCAST, PRECISION)
    _store_rows(dq_head, stride_dqs, stride_dqd, offs_m, offs_d, seq_q, dq * scale)


# ----------------------------------------------------------------------------------------------------------
# Autotuning (CUDA only; the interpreter runs INTERPRET_BLOCKS)
# ----------------------------------------------------------------------------------------------------------

def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, GPU generation and head dim (16 and 32 use the 64
# lists); the backward keeps the iterated-over dimension small (BLOCK_M for dk/dv, BLOCK_N for dq), as
# FlashAttention-2 does. fp32 inputs get small tiles on every GPU: their "ieee" dots run on FMA units, and larger
# tiles spill registers and take tens of seconds each to compile. tests/kernels/test_triton_compile.py compiles
# every entry for sm_80 / sm_90 (no GPU needed) and checks that it fits in shared memory and spills no
# registers; which one is fastest is left to the autotuner.
_TILES = {
    ("_attn_fwd", "hopper", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
    ("_attn_fwd", "hopper", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("_attn_fwd", "hopper", 256): [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 1)],
    ("_attn_fwd", "ampere", 64): [(128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("_attn_fwd", "ampere", 128): [(128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3)],
    ("_attn_fwd", "ampere", 256): [(64, 64, 8, 2), (64, 32, 8, 2)],
    ("_attn_fwd", "fp32", 64): [(32, 32, 8, 1), (32, 16, 8, 1)],
    ("_attn_fwd", "fp32", 128): [(32, 16, 8, 1), (16, 32, 8, 1)],
    ("_attn_fwd", "fp32", 256): [(16, 32, 8, 1), (32, 16, 8, 1)],
    ("_attn_bwd_dkdv", "hopper", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
    ("_attn_bwd_dkdv", "hopper", 128): [(32, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 3), (16, 64, 8, 3)],
    ("_attn_bwd_dkdv", "hopper", 256): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("_attn_bwd_dkdv", "ampere", 64): [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)],
    ("_attn_bwd_dkdv", "ampere", 128): [(32, 64, 8, 2), (64, 64, 8, 2), (16, 64, 8, 2)],
    ("_attn_bwd_dkdv", "ampere", 256): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("_attn_bwd_dkdv", "fp32", 64): [(16, 16, 8, 1), (32, 32, 8, 1)],
    ("_attn_bwd_dkdv", "fp32", 128): [(32, 16, 8, 1), (16, 32, 8, 1)],
    ("_attn_bwd_dkdv", "fp32", 256): [(16, 16, 8, 1)],
    ("_attn_bwd_dq", "hopper", 64): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("_attn_bwd_dq", "hopper", 128): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3)],
    ("_attn_bwd_dq", "hopper", 256): [(64, 32, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2)],
    ("_attn_bwd_dq", "ampere", 64): [(128, 32, 8, 3), (64, 32, 4, 3), (128, 16, 8, 3), (64, 16, 4, 3)],
    ("_attn_bwd_dq", "ampere", 128): [(64, 32, 8, 2), (64, 32, 4, 2), (128, 16, 8, 2), (64, 16, 4, 2)],
    ("_attn_bwd_dq", "ampere", 256): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2)],
    ("_attn_bwd_dq", "fp32", 64): [(32, 32, 8, 1), (16, 16, 8, 1)],
    ("_attn_bwd_dq", "fp32", 128): [(32, 32, 8, 1), (16, 32, 8, 1)],
    ("_attn_bwd_dq", "fp32", 256): [(16, 32, 8, 1), (32, 16, 8, 1)],
}
_CONFIGS = {key: _configs(tiles) for key, tiles in _TILES.items()}


# dk/dv tiles that spill registers once they also accumulate dq atomically (found by the compile check).
_ATOMIC_DQ_SPILLS = {("hopper", 128, (64, 64, 8, 3)), ("ampere", 256, (16, 32, 4, 2)), ("fp32", 128, (16, 32, 8, 1))}


def _pick(kernel):
    def pick(major, args):
        """The configs for this GPU generation (Hopper is major 9), input dtype and head dim."""
        generation = "fp32" if args["Q"].dtype == torch.float32 else "hopper" if major >= 9 else "ampere"
        dim = 64 if args["HEAD_DIM"] <= 64 else args["HEAD_DIM"]
        configs = _CONFIGS[(kernel, generation, dim)]
        if args.get("ATOMIC_DQ"):
            configs = [c for c in configs if (generation, dim, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                                c.num_warps, c.num_stages)) not in _ATOMIC_DQ_SPILLS]
        return configs
    return pick


# Which configs each autotuned kernel may try, as pick(major, args); the compile test reads this too.
PICKS = {kernel: _pick(kernel) for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")}


def _tuned(kernel, key=(), reset_to_zero=None):
    every = [c for (name, _, _), configs in _CONFIGS.items() if name == kernel.__name__ for c in configs]
    return triton.autotune(every, key=["seq_q", "seq_k", "HEAD_DIM", "CAUSAL", *key], reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": prune_by_arch(PICKS[kernel.__name__])})(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd)
# Timing a config runs it several times: the atomically accumulated dq must start from zero each time.
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, key=("ATOMIC_DQ",), reset_to_zero=["DQ_ACC"])
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq)


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
    args = (q, k, v, out, lse, scale * LOG2E, heads, heads // kv_heads, seq_q, seq_k, *_strides(q), *_strides(k),
            *_strides(v), *_strides(out))
    _launch(_attn_fwd, _attn_fwd_tuned, "fwd", lambda bm, bn: (cdiv(seq_q, bm), batch * heads), args, meta,
            blocks)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, causal=True, softmax_scale=None, dq=None, dk=None, dv=None,
                       delta=None, blocks=None, atomic_dq=False):
    """Triton backward: returns (dq, dk, dv). Buffers may be given, as in attention_forward; `blocks` maps
    "dkdv" and "dq" to (BLOCK_M, BLOCK_N). atomic_dq: the dk/dv kernel also accumulates dq (fp32 atomics,
    FlashAttention-2's way: fewer tile products, results that vary in the last bits from run to run) and
    the dq kernel does not run."""
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
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic_dq else dq
    _launch(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, "dkdv", lambda bm, bn: (cdiv(seq_k, bn), batch * kv_heads),
            (*common, dk, dv, dq_acc, scale, scale * LOG2E, heads, kv_heads, group, seq_q, seq_k, *strides,
             *_strides(dk), *_strides(dv)), {**meta, "ATOMIC_DQ": bool(atomic_dq)}, blocks)
    if atomic_dq:
        dq.copy_(dq_acc.mul_(scale))
        return dq, dk, dv
    _launch(_attn_bwd_dq, _attn_bwd_dq_tuned, "dq", lambda bm, bn: (cdiv(seq_q, bm), batch * heads),
            (*common, dq, scale, scale * LOG2E, heads, group, seq_q, seq_k, *strides, *_strides(dq)), meta,
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
                    lse: torch.Tensor, causal: bool, softmax_scale: float,
                    atomic_dq: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, causal, softmax_scale, atomic_dq=atomic_dq)


@_flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, causal, softmax_scale, atomic_dq=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, atomic_dq):
        out, lse = torch.ops.megaengine.flash_attn_fwd(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.atomic_dq = causal, softmax_scale, atomic_dq
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.megaengine.flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                                         ctx.atomic_dq)
        return dq, dk, dv, None, None, None


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


def flash_attention(q, k, v, causal=True, softmax_scale=None, backend=None, atomic_dq=False):
    """softmax(q k^T * scale [+ causal mask]) v for q (batch, heads, seq, head_dim) and k, v with kv heads
    dividing heads. backend: "triton", "torch" (the reference) or None (Triton on CUDA, torch on CPU).
    atomic_dq: the Triton backward accumulates dq with fp32 atomics in the dk/dv kernel (see
    attention_backward); not bitwise reproducible."""
    backend = resolve_backend(backend, q, ("triton", "torch"))
    if backend == "torch":
        return attention_reference(q, k, v, causal, softmax_scale)
    check_triton_inputs(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttention.apply(q, k, v, bool(causal), float(scale), bool(atomic_dq))

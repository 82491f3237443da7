"""Attention on one (query block, key/value block) pair, returning what ring attention needs to combine
blocks: the output with its log-sum-exp forward, and the gradients given the *combined* output and
log-sum-exp backward (the probabilities of a block are exp(s - lse_total), so each block's gradients are
exact pieces of the full ones).

Two backends behind one pair of functions: megaengine's Triton flash attention (CUDA, or CPU under
TRITON_INTERPRET=1) and a plain torch version (CPU, tests). Layout as everywhere: q (batch, heads, seq_q, d),
k and v (batch, kv_heads, seq_k, d) with kv_heads dividing heads; the causal mask is top-left aligned.
"""
from __future__ import annotations

import torch

from megaengine.kernels.attention import (attention_backward, attention_forward, attention_reference,
                                          check_triton_inputs)


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Outputs, log-sum-exps and gradients are summed over blocks in fp32 (fp64 stays fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_forward(q, k, v, causal: bool, scale: float, backend: str):
    """(out in q's dtype, lse in the accumulation dtype, shape (batch, heads, seq_q))."""
    if backend == "triton":
        check_triton_inputs(q, k, v)
        return attention_forward(q, k, v, causal, scale)
    return attention_reference(q, k, v, causal, scale, return_lse=True)


def block_backward(dout, q, k, v, out, lse, causal: bool, scale: float, backend: str):
    """(dq, dk, dv) of this block, for the rows' final `out` and `lse` (not the block's own)."""
    if backend == "triton":
        return attention_backward(dout, q, k, v, out, lse.contiguous(), causal, scale)
    return _torch_backward(dout, q, k, v, out, lse, causal, scale)


def _torch_backward(dout, q, k, v, out, lse, causal, scale):
    compute = accumulate_dtype(q)
    batch, heads, seq_q, d = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q, dout, out = q.to(compute), dout.to(compute), out.to(compute)
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.exp(scores - lse.to(compute)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dout * out).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    # GQA: a kv head's gradient sums over the query heads of its group.
    dk = dk.view(batch, kv_heads, group, seq_k, d).sum(2)
    dv = dv.view(batch, kv_heads, group, seq_k, d).sum(2)
    return dq, dk, dv


class BlockAttention(torch.autograd.Function):
    """Attention on one block that keeps only q, k, v, the output and the log-sum-exp for the backward (flash
    style, on either backend): the torch backend would otherwise keep the (seq_q, seq_k) probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        out, lse = block_forward(q, k, v, causal, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def block_attention(q, k, v, causal: bool, scale: float, backend: str):
    return BlockAttention.apply(q, k, v, causal, scale, backend)

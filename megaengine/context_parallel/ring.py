"""Ring attention (context parallel, --cp-comm-type p2p) over the load-balanced layout of layout.py.

Each rank holds q, k, v for its two chunks (i and 2cp-1-i). K and V travel one hop around the cp ring per
step (one batched isend/irecv of a stacked [k; v] buffer, posted before the attention on the block in hand,
so the transfer overlaps it); after cp steps every query has seen every key. Block outputs are merged by
their log-sum-exp. The backward recomputes each block from the saved q, k, v, output and log-sum-exp, sends
K/V around the ring again, and sends a dK/dV accumulator along with them: the accumulator of block j is
started by rank j+1, gathers every rank's contribution and arrives back at rank j after cp-1 hops, where the
owner adds the gradient of its own (diagonal) block, computed first while the first K/V hop is in flight.

Bytes each rank sends per call, with KV = 2·batch·kv_heads·(seq/cp)·head_dim (its K and V elements):
forward (cp-1)·KV in the input dtype; backward (cp-1)·KV in the input dtype plus (cp-1)·KV in the
accumulation dtype (fp32: gradients are summed over cp blocks, so they travel unrounded).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaengine.context_parallel.blocks import accumulate_dtype, block_backward, block_forward
from megaengine.parallel import comm

_ALL = slice(None)


class _Shift:
    """One hop around the ring: send `t` to the next rank, receive the previous rank's into a new buffer."""

    def __init__(self, t: torch.Tensor, group):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.sent, self.buffer = t, torch.empty_like(t)
        self.works = comm.batch_isend_irecv([
            dist.P2POp(dist.isend, t, dist.get_global_rank(group, (r + 1) % n), group),
            dist.P2POp(dist.irecv, self.buffer, dist.get_global_rank(group, (r - 1) % n), group)])

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        return self.buffer


def block_plan(step: int, rank: int, cp: int, causal: bool, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the attention at `step`, when this rank holds the K/V of rank
    (rank - step) % cp. Causal: step 0 is the rank's own two chunks, a plain causal mask on the local
    sequence; an earlier rank's first chunk is seen whole by both query chunks and its second chunk by
    neither; a later rank's two chunks are seen whole by the second query chunk only."""
    if step == 0:
        return _ALL, _ALL, causal
    if not causal:
        return _ALL, _ALL, False
    if (rank - step) % cp < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's softmax-normalised output into the running one, in place (views allowed)."""
    new = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new).unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * torch.exp(block_lse - new).unsqueeze(-1))
    lse.copy_(new)


def ring_forward(q, k, v, group, causal: bool, scale: float, backend: str):
    """(out in q's dtype, lse in the accumulation dtype) for this rank's queries over the whole sequence."""
    cp, rank, half = dist.get_world_size(group), dist.get_rank(group), q.shape[2] // 2
    acc = accumulate_dtype(q)
    # (seq, batch, heads, d) in memory, (batch, heads, seq, d) in shape: the layer's permute back to (seq, batch,
    # hidden) is then a view, not a copy the next projection would save for its backward.
    b, h, s, d = q.shape
    out = torch.zeros((s, b, h, d), dtype=acc, device=q.device).permute(1, 2, 0, 3)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    for step in range(cp):
        shift = _Shift(kv, group) if step + 1 < cp else None
        rows, cols, masked = block_plan(step, rank, cp, causal, half)
        block_out, block_lse = block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], masked, scale,
                                             backend)
        _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
        if shift is not None:
            kv = shift.wait()
    return out.to(q.dtype), lse


def _block_grads(step, kv, dout, q, out, lse, rank, cp, causal, scale, backend):
    """(query rows, key rows, (dq, dk, dv)) of the attention at `step`."""
    rows, cols, masked = block_plan(step, rank, cp, causal, q.shape[2] // 2)
    grads = block_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                           out[:, :, rows], lse[:, :, rows], masked, scale, backend)
    return rows, cols, grads


def _add(dq, dkv, rows, cols, grads) -> None:
    dq[:, :, rows] += grads[0]
    dkv[0][:, :, cols] += grads[1]
    dkv[1][:, :, cols] += grads[2]


def ring_backward(dout, q, k, v, out, lse, group, causal: bool, scale: float, backend: str):
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    acc = accumulate_dtype(q)
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    own = torch.zeros(kv.shape, dtype=acc, device=q.device)
    shift = _Shift(kv, group) if cp > 1 else None
    args = (dout, q, out, lse, rank, cp, causal, scale, backend)
    _add(dq, own, *_block_grads(0, kv, *args))
    arriving = None  # the dK/dV accumulator of the block in hand, on its way from the previous rank
    for step in range(1, cp):
        kv = shift.wait()
        shift = _Shift(kv, group) if step + 1 < cp else None
        rows, cols, grads = _block_grads(step, kv, *args)
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device) if arriving is None else arriving.wait()
        _add(dq, dkv, rows, cols, grads)
        arriving = _Shift(dkv, group)
    if arriving is not None:
        own += arriving.wait()
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, backend):
        out, lse = ring_forward(q, k, v, group, causal, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.backend = group, causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.causal, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, group, causal: bool, scale: float, backend: str):
    return RingAttention.apply(q, k, v, group, causal, scale, backend)

"""All-to-all context parallelism (DeepSpeed Ulysses, --cp-comm-type a2a).

q, k and v arrive sequence-sharded (this rank's two zigzag chunks, all local heads); one all-to-all each
makes them head-sharded (heads/cp of them, the whole sequence), attention runs on the whole sequence with an
ordinary kernel (blocks.block_attention: Triton's or torch's, keeping only q, k, v, out and the log-sum-exp for
the backward), and one all-to-all brings the output back to sequence shards. The zigzag order is undone
after the exchange and redone before the return one, so the kernel sees tokens in their true order and the
causal mask is the plain one. Needs the local heads and kv heads divisible by cp.

Bytes each rank sends per call: forward (cp-1)/cp · batch·(seq/cp)·head_dim·(2·heads + 2·kv_heads) in the
input dtype (q, k, v and the output; a rank keeps its own 1/cp), the backward the same for dout, dq, dk, dv.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaengine.context_parallel.blocks import block_attention
from megaengine.context_parallel.layout import layout_order
from megaengine.parallel import comm


def _to_heads(x: torch.Tensor, group, inverse: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq/cp, d) sequence shard -> (batch, heads/cp, seq, d), tokens in sequence order."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    x = comm.all_to_all(x.reshape(b, cp, h // cp, s, d).transpose(0, 1), group)  # piece j: rank j's tokens
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * s, d).index_select(2, inverse)


def _to_sequence(x: torch.Tensor, group, order: torch.Tensor) -> torch.Tensor:
    """The inverse of _to_heads."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    x = x.index_select(2, order).reshape(b, h, cp, s // cp, d).permute(2, 0, 1, 3, 4)
    return comm.all_to_all(x, group).transpose(0, 1).reshape(b, cp * h, s // cp, d)


def ulysses_attention(q, k, v, group, causal: bool, scale: float, backend: str):
    cp = dist.get_world_size(group)
    order = layout_order(q.shape[2] * cp, cp).to(q.device)
    inverse = torch.argsort(order)
    q, k, v = (_to_heads(t, group, inverse) for t in (q, k, v))
    return _to_sequence(block_attention(q, k, v, causal, scale, backend), group, order)

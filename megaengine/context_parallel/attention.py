"""context_parallel_attention: the one entry point for attention over a sequence sharded across a cp group."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from megaengine.context_parallel.ring import ring_attention
from megaengine.context_parallel.ulysses import ulysses_attention
from megaengine.context_parallel.validate import COMM_TYPES
from megaengine.errors import ConfigError
from megaengine.kernels._shared import resolve_backend
from megaengine.kernels.attention import flash_attention


@dataclass(frozen=True)
class ContextParallel:
    """A cp group as the model uses it: the ranks sharing each sequence, and how K/V travel between them."""
    group: object
    comm_type: str = "p2p"

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)


def context_parallel_attention(q, k, v, group, *, causal: bool = True, comm_type: str = "p2p",
                               softmax_scale: float | None = None, backend: str | None = None):
    """softmax(q k^T · scale [+ causal mask]) v over the whole sequence, for this rank's share of it.

    q (batch, heads, 2c, d), k and v (batch, kv_heads, 2c, d), kv_heads dividing heads: the rank's two chunks
    (layout.zigzag_indices) concatenated. Returns this rank's output rows, differentiable in q, k, v.
    comm_type: "p2p" (ring attention) or "a2a" (Ulysses all-to-all; needs heads and kv_heads divisible by the
    group size). backend: "triton", "torch" or None (Triton on CUDA, torch on CPU) for the block kernel.
    """
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"--cp-comm-type={comm_type!r} is not supported; choose p2p or a2a.")
    backend = resolve_backend(backend, q, ("triton", "torch"))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cp = dist.get_world_size(group)
    if cp == 1:
        return flash_attention(q, k, v, causal, scale, backend)
    if q.shape[2] % 2 or k.shape[2] != q.shape[2]:
        raise ValueError(f"context-parallel attention wants q, k, v with the same even local length (two "
                         f"chunks), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if comm_type == "p2p":
        return ring_attention(q, k, v, group, causal, scale, backend)
    if q.shape[1] % cp or k.shape[1] % cp:
        raise ValueError(f"a2a context parallelism splits heads over cp={cp}: q has {q.shape[1]} heads and k "
                         f"{k.shape[1]}; check_context_parallel reports this up front")
    return ulysses_attention(q, k, v, group, causal, scale, backend)

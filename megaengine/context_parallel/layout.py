"""Which tokens a context-parallel rank holds: the load-balanced ("zigzag") split of the sequence.

The sequence is cut into 2·cp equal chunks and rank i holds chunks i and 2·cp-1-i, in that order, so under a
causal mask every rank has the same attention work (an early chunk with little to attend to, and a late one
with much). Every per-token tensor of a rank (tokens, labels, loss mask, position ids, RoPE rows) is this
same selection of the full sequence; these functions are the only place the order is defined.
"""
from __future__ import annotations

import torch


def zigzag_indices(seq: int, cp: int, rank: int) -> torch.Tensor:
    """The sequence positions (int64, ascending) rank `rank` of `cp` holds: chunk `rank`, then chunk
    `2*cp-1-rank`, of 2*cp chunks of seq/(2*cp) tokens."""
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not in [0, cp={cp})")
    if seq % (2 * cp):
        raise ValueError(f"sequence length {seq} is not divisible by 2 x cp = {2 * cp}")
    chunk = seq // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def layout_order(seq: int, cp: int) -> torch.Tensor:
    """The positions of every rank's tokens, rank after rank: what concatenating the ranks' pieces holds."""
    return torch.cat([zigzag_indices(seq, cp, r) for r in range(cp)])


def position_ids(seq: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions of this rank's tokens in the whole sequence: index learned position embeddings and the rows
    of full-sequence RoPE tables with them (cos[ids], sin[ids])."""
    return zigzag_indices(seq, cp, rank).to(device)


def split_for_rank(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor: dim 1 for (batch, seq) tokens, labels and loss masks,
    dim 0 for (seq, batch, ...) activations, dim 2 for (batch, heads, seq, head_dim)."""
    if cp == 1:
        return x
    return x.index_select(dim, zigzag_indices(x.shape[dim], cp, rank).to(x.device))


def merge_from_ranks(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of split_for_rank: the full sequence from every rank's piece (listed by rank)."""
    x = torch.cat(parts, dim)
    order = layout_order(x.shape[dim], len(parts)).to(x.device)
    return x.index_select(dim, torch.argsort(order))

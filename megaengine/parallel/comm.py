"""Collectives: counted wrappers over torch.distributed and the autograd-aware ones tensor parallelism needs.

Every collective the engine issues goes through the counted wrappers here, so tests can compare the bytes a
rank moves with the theory (ZeRO paper, Megatron papers). `comm_stats.volume` uses the ring model: an
all-reduce of S bytes moves 2 S (n-1)/n, an all-gather or reduce-scatter of S bytes (the full tensor) moves
S (n-1)/n, an all-to-all of S bytes (this rank's input) moves exactly what leaves the rank (S less the split it
keeps for itself: S (n-1)/n with equal splits), and a point-to-point send of S bytes moves S ("send", one call
per message).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class CommStats:
    """Per-process byte counts, by operation name."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)  # size of the full tensor each call works on
        self.volume: dict[str, float] = defaultdict(float)  # ring-model bytes this rank sends

    def record(self, op: str, nbytes: int, n: int, volume: float | None = None) -> None:
        """`volume`: the bytes this rank sends, when the ring model does not give them (uneven all-to-all)."""
        # A point-to-point send moves all its bytes; a collective over n ranks moves the ring-model share
        # (all-reduces, sums or FP8's MAX, twice: reduce-scatter then all-gather).
        factor = 1.0 if op == "send" else (2.0 if op.startswith("all_reduce") else 1.0) * (n - 1) / n
        self.calls[op] += 1
        self.bytes[op] += nbytes
        self.volume[op] += factor * nbytes if volume is None else volume

    def total_volume(self) -> float:
        return sum(self.volume.values())


comm_stats = CommStats()

# torch 2.13 renamed the tensor collectives; 2.11 (the GPU machines') only has the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM, async_op: bool = False):
    n = _size(group)
    if n == 1:
        return None
    comm_stats.record("all_reduce", _nbytes(t), n)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def all_reduce_max(t: torch.Tensor, group=None):
    """In-place MAX all-reduce (FP8 amaxes), counted as its own operation, apart from the gradients' sums."""
    n = _size(group)
    if n == 1:
        return None
    comm_stats.record("all_reduce_max", _nbytes(t), n)
    return dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)


def all_gather_into_tensor(out: torch.Tensor, shard: torch.Tensor, group=None, async_op: bool = False):
    n = _size(group)
    if n == 1:
        out.copy_(shard.reshape(out.shape))
        return None
    comm_stats.record("all_gather", _nbytes(out), n)
    return _all_gather_single(out, shard.contiguous(), group=group, async_op=async_op)


def reduce_scatter_tensor(out: torch.Tensor, full: torch.Tensor, group=None, op=dist.ReduceOp.SUM,
                          async_op: bool = False):
    n = _size(group)
    if n == 1:
        out.copy_(full.reshape(out.shape))
        return None
    comm_stats.record("reduce_scatter", _nbytes(full), n)
    return _reduce_scatter_single(out, full.contiguous(), op=op, group=group, async_op=async_op)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False, *,
                      out_splits=None, in_splits=None):
    """Rows of `inp` go to the ranks of `group` in `in_splits` pieces (equal pieces when None: piece j to rank
    j); `out` receives `out_splits` rows from each rank, in rank order."""
    n = _size(group)
    if n == 1:
        out.copy_(inp.reshape(out.shape))
        return None
    rows = inp.shape[0]
    kept = in_splits[dist.get_rank(group)] if in_splits is not None else rows // n
    comm_stats.record("all_to_all", _nbytes(inp), n, volume=(rows - kept) * _nbytes(inp[:1]))
    return dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group, async_op=async_op)


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    n = _size(group)
    if n == 1:
        return None
    comm_stats.record("broadcast", _nbytes(t), n)
    return dist.broadcast(t, src=src, group=group, async_op=async_op)


def batch_isend_irecv(ops: list) -> list:
    """Post a list of dist.P2POp (isend / irecv, peers as global ranks) as one batch; returns the works to
    wait on. Counts the bytes of each send."""
    for op in ops:
        if "send" in op.op.__name__:
            comm_stats.record("send", _nbytes(op.tensor), 2)
    return dist.batch_isend_irecv(ops) if ops else []


# ---------------------------------------------------------------------------------------------------------
# Tensor-parallel building blocks. Shapes along `dim` must divide by the group size.

def _along_dim(x: torch.Tensor, group, dim: int, rows, collective) -> torch.Tensor:
    """Run a dim-0 collective on `x` along `dim`: the output has rows(x.shape[dim]) entries there."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((rows(x.shape[0]),) + tuple(x.shape[1:]))
    collective(out, x, group)
    return out.movedim(0, dim)


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    return x if n == 1 else _along_dim(x, group, dim, lambda r: n * r, all_gather_into_tensor)


def _shards(x: torch.Tensor, group, dim: int) -> int:
    """The group size, which must divide x's size along `dim`."""
    n = _size(group)
    if n > 1 and x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {n}")
    return n


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _shards(x, group, dim)
    return x if n == 1 else _along_dim(x, group, dim, lambda r: r // n, reduce_scatter_tensor)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _shards(x, group, dim)
    return x if n == 1 else x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    all_reduce(x, group)
    return x


def _all_to_all(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    all_to_all_single(out, x, group)
    return out


def _conjugate_pair(name: str, forward, backward):
    """An autograd Function running `forward(x, group, dim)` and, on the gradient, its conjugate `backward`."""
    def fwd(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return forward(x, group, dim)

    def bwd(ctx, g):
        return backward(g, ctx.group, ctx.dim), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(x, group, dim):
    return x.view_as(x)


_CopyToRegion = _conjugate_pair("CopyToRegion", _identity, lambda g, group, dim: _all_reduce(g, group))
_ReduceFromRegion = _conjugate_pair("ReduceFromRegion", lambda x, group, dim: _all_reduce(x, group), _identity)
_ScatterToRegion = _conjugate_pair("ScatterToRegion", _split, _gather)
_GatherFromRegion = _conjugate_pair("GatherFromRegion", _gather, _split)
_AllGatherSequence = _conjugate_pair("AllGatherSequence", _gather, _reduce_scatter)
_ReduceScatterSequence = _conjugate_pair("ReduceScatterSequence", _reduce_scatter, _gather)
# With equal pieces an all-to-all is its own conjugate: the gradient of piece j goes back to rank j.
_AllToAll = _conjugate_pair("AllToAll", _all_to_all, _all_to_all)


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single as an autograd op: the gradient goes back along the same rows, splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        all_to_all_single(out, x, group, out_splits=out_splits, in_splits=in_splits)
        return out

    @staticmethod
    def backward(ctx, g):
        return all_to_all_rows(g, *ctx.splits, ctx.group), None, None, None


def all_to_all_rows(x, out_splits: list[int], in_splits: list[int], group):
    """Send in_splits[r] rows of x to rank r, receive out_splits[r] rows from rank r (rank order); autograd-aware."""
    return x if _size(group) == 1 else _AllToAllRows.apply(x, list(out_splits), list(in_splits), group)


def copy_to_tp_region(x, group):
    """Identity forward; all-reduce of the gradient backward (the input of a column-parallel layer)."""
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group, 0)


def reduce_from_tp_region(x, group):
    """All-reduce forward; identity backward (the output of a row-parallel layer)."""
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group, 0)


def scatter_to_tp_region(x, group, dim: int = -1):
    """Keep this rank's chunk along `dim`; all-gather the gradient backward."""
    return _ScatterToRegion.apply(x, group, dim % x.dim())


def gather_from_tp_region(x, group, dim: int = -1):
    """All-gather chunks along `dim`; keep this rank's chunk of the gradient backward."""
    return _GatherFromRegion.apply(x, group, dim % x.dim())


def all_gather_sequence(x, group, dim: int = 0):
    """Sequence parallel: all-gather sequence shards forward, reduce-scatter the gradient backward."""
    return x if _size(group) == 1 else _AllGatherSequence.apply(x, group, dim % x.dim())


def reduce_scatter_sequence(x, group, dim: int = 0):
    """Sequence parallel: reduce-scatter partial sums into sequence shards forward, all-gather backward."""
    return x if _size(group) == 1 else _ReduceScatterSequence.apply(x, group, dim % x.dim())


def scatter_sequence(x, group, dim: int = 0):
    """Enter the sequence-parallel region from a replicated tensor: keep this rank's sequence shard."""
    return _ScatterToRegion.apply(x, group, dim % x.dim())


def gather_sequence(x, group, dim: int = 0):
    """Leave the sequence-parallel region: all-gather shards forward, keep this rank's shard of the gradient."""
    return _GatherFromRegion.apply(x, group, dim % x.dim())


def all_to_all(x, group):
    """Equal pieces along dim 0 (size = group size): piece j goes to rank j, piece j of the result came from
    rank j; the gradient travels back the same way. Context parallelism's sequence <-> head exchange."""
    return x if _size(group) == 1 else _AllToAll.apply(x, group, 0)

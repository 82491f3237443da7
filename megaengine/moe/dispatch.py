"""Token dispatchers: send each (token, expert) assignment to the rank holding the expert, run the local
experts on what arrived, bring the outputs back and sum them per token with the routing weights.

Both take tokens (T, hidden), the routing (T, k) and an `experts(rows, counts)` function of rows sorted by
local expert, and return (T, hidden); the expert-parallel group is passed in, rank r holding experts
[r E/ep, (r+1) E/ep). Every step is differentiable (index ops and the autograd collectives of comm).

- alltoall (Megatron's default): the kept assignments, sorted by expert, go out with one all_to_all_single
  whose split sizes come from an all-gather of the per-expert counts (E integers per rank), and the outputs
  return by the reverse all-to-all; the routing weights are applied back home. Per layer and rank the forward
  sends k T hidden elements (dropless) and returns what it received, less the rows kept for its own experts.
- allgather: every rank all-gathers the whole group's tokens, weights and expert ids, computes its experts'
  weighted share of every token, and a reduce-scatter sums the shares back to each token's rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaengine.moe.router import Routing
from megaengine.parallel import comm


def sort_by_expert(experts: torch.Tensor, first: int, count: int, kept: torch.Tensor | None = None):
    """(slots, counts): the flat (token * k + j) indices of the assignments to experts [first, first + count),
    kept ones only, grouped by expert (token order within an expert), and how many each expert got."""
    local = experts.flatten() - first
    valid = (local >= 0) & (local < count)
    if kept is not None:
        valid &= kept.flatten()
    slots = valid.nonzero().squeeze(1)
    slots = slots[local[slots].sort(stable=True).indices]
    return slots, torch.bincount(local[slots], minlength=count)


def combine(rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * rows[slot of (t, j)], an absent slot counting 0 (T, hidden). Each slot is
    written once, then summed over k in a fixed order: deterministic, unlike an atomic index_add."""
    tokens, k = weights.shape
    full = rows.new_zeros(tokens * k, rows.shape[1]).index_put((slots,), rows)
    return (full.view(tokens, k, -1) * weights.unsqueeze(-1).to(rows.dtype)).sum(dim=1)


def group_size_rank(group) -> tuple[int, int]:
    """(size, rank) in the expert-parallel group; None means no expert parallelism (the mesh's ep_group at ep 1)."""
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


class Dispatcher:
    """Rank r of `group` holds experts [r E/ep, (r+1) E/ep); `group` None: this rank holds them all."""

    def __init__(self, num_experts: int, group):
        self.num_experts, self.group = num_experts, group
        self.size, self.rank = group_size_rank(group)
        self.local_experts = num_experts // self.size

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        if self.size == 1:  # every expert is here: no communication, whichever dispatcher
            slots, counts = sort_by_expert(routing.experts, 0, self.num_experts, routing.kept)
            return combine(experts(x[slots // routing.experts.shape[1]], counts), slots, routing.weights)
        return self.dispatch(x, routing, experts)


class AllToAllDispatcher(Dispatcher):
    def dispatch(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        k, n, local = routing.experts.shape[1], self.size, self.local_experts
        slots, counts = sort_by_expert(routing.experts, 0, self.num_experts, routing.kept)
        rows = x[slots // k]
        # Everyone learns every rank's per-expert counts: the split sizes of both all-to-alls.
        matrix = counts.new_empty(n * self.num_experts)
        comm.all_gather_into_tensor(matrix, counts, self.group)
        # (source rank, local expert): what each rank sends to this one's experts.
        mine = matrix.view(n, self.num_experts)[:, self.rank * local:(self.rank + 1) * local]
        send, recv = torch.stack([counts.view(n, local).sum(1), mine.sum(1)]).tolist()  # one host sync
        arrived = comm.all_to_all_rows(rows, recv, send, self.group)  # by source rank, then by expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(n), mine.flatten(),
                                                output_size=arrived.shape[0])
        order = expert_of_row.sort(stable=True).indices  # by expert, then by source rank
        out = experts(arrived[order], mine.sum(0))
        back = comm.all_to_all_rows(out[order.argsort()], send, recv, self.group)
        return combine(back, slots, routing.weights)


class AllGatherDispatcher(Dispatcher):
    def dispatch(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        ids = routing.experts if routing.kept is None else routing.experts.masked_fill(~routing.kept, -1)
        x_all = comm.all_gather_sequence(x, self.group, dim=0)
        weights_all = comm.all_gather_sequence(routing.weights, self.group, dim=0)
        ids_all = ids.new_empty((self.size * ids.shape[0], ids.shape[1]))
        comm.all_gather_into_tensor(ids_all, ids, self.group)
        k, first = ids.shape[1], self.rank * self.local_experts
        slots, counts = sort_by_expert(ids_all, first, self.local_experts)
        mine = combine(experts(x_all[slots // k], counts), slots, weights_all)
        return comm.reduce_scatter_sequence(mine, self.group, dim=0)


DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}

"""Expert-parallel groups carved out of the data-parallel ranks, as Megatron lays them out.

With the (dp, pp, tp) mesh (rank = (d * pp + p) * tp + t), the dp index splits as d = e_dp * ep + e: an
expert-parallel (ep) group is `ep` consecutive dp ranks at the same (pp, tp) position, which between them hold
all the experts; the expert-data-parallel (edp) group is the dp/ep ranks holding the same experts (same e),
over which expert gradients are reduced and expert optimizer state is sharded.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def expert_group_ranks(dp: int, pp: int, tp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ep groups, edp groups) as lists of global ranks, each group in rank order."""
    ranks = torch.arange(dp * pp * tp).reshape(dp // ep, ep, pp, tp)
    ep_groups = ranks.permute(0, 2, 3, 1).reshape(-1, ep)
    edp_groups = ranks.permute(1, 2, 3, 0).reshape(-1, dp // ep)
    return ep_groups.tolist(), edp_groups.tolist()


def new_expert_groups(dp: int, pp: int, tp: int, ep: int):
    """(ep group, edp group) of this rank. Collective: every rank creates every group, in the same order."""
    me, mine = dist.get_rank(), [None, None]
    for i, layout in enumerate(expert_group_ranks(dp, pp, tp, ep)):
        for members in layout:
            group = dist.new_group(members)
            if me in members:
                mine[i] = group
    return tuple(mine)

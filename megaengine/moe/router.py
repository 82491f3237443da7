"""The top-k softmax router: which k experts each token goes to and with what weight, which assignments
fall over an expert's capacity, and the two auxiliary losses.

Routing follows Mixtral: a softmax over all experts (in fp32), the k largest probabilities, renormalised to
sum to 1 (identical to Megatron's softmax over the top-k logits). The load-balancing loss is Switch/GShard's
E * sum_i f_i P_i, f_i the fraction of the k*T assignments that chose expert i (before capacity drops, as
Megatron counts them), P_i the mean router probability of expert i; the z-loss is ST-MoE's mean over tokens
of logsumexp(logits)^2. Both are per micro-batch. Under sequence parallelism each tp rank routes its own
sequence shard: the counts are summed over tp, and each rank's loss is its tokens' share, so the shares add
up over tp to the loss of the whole micro-batch (the tp sum of the router's gradient then follows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaengine.moe.config import MoEConfig, expert_capacity
from megaengine.parallel import comm
from megaengine.tensor_parallel.layers import replicated_param


@dataclass
class Routing:
    experts: torch.Tensor  # (tokens, k) expert ids
    weights: torch.Tensor  # (tokens, k) fp32 combine weights, 0 where the assignment was dropped
    kept: torch.Tensor | None  # (tokens, k) bool, None when dropless
    loss: torch.Tensor | None  # coefficient-weighted aux + z loss (this rank's share), for backward
    stats: dict  # detached loss values without coefficients, this rank's share, for the logs


def topk_softmax(logits: torch.Tensor, k: int):
    """(probs (T, E) fp32, weights (T, k) renormalised, experts (T, k))."""
    probs = logits.float().softmax(dim=-1)
    top, experts = probs.topk(k, dim=-1)
    return probs, top / top.sum(dim=-1, keepdim=True), experts


def capacity_mask(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
                  policy: str = "probs") -> torch.Tensor:
    """(T, k) bool: the assignments each expert keeps, at most `capacity` of them. "probs" keeps an expert's
    highest-weight assignments, "position" its first tokens; ties go to the earlier token, so the choice is
    deterministic (Megatron's torch.topk leaves ties unspecified)."""
    flat_e, flat_w = experts.flatten(), weights.detach().flatten()
    order = torch.arange(flat_e.numel(), device=experts.device)  # token-major: earlier tokens first
    if policy == "probs":
        order = order[flat_w.sort(descending=True, stable=True).indices]
    order = order[flat_e[order].sort(stable=True).indices]  # grouped by expert, preferred first
    counts = torch.bincount(flat_e, minlength=num_experts)
    rank_in_expert = torch.arange(order.numel(), device=experts.device) - (counts.cumsum(0) - counts)[flat_e[order]]
    kept = torch.empty_like(flat_e, dtype=torch.bool)
    kept[order] = rank_in_expert < capacity
    return kept.view_as(experts)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, total_tokens: int, topk: int) -> torch.Tensor:
    """E * sum_i f_i P_i with f_i = counts_i / (k T) and P_i = sum over these tokens of probs / T, T the
    micro-batch's tokens (all tp ranks'): this rank's share when `probs` holds only its tokens."""
    num_experts = probs.shape[-1]
    return num_experts / (topk * total_tokens ** 2) * (probs.sum(dim=0) * counts.to(probs.dtype)).sum()


def z_loss(logits: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Sum over these tokens of logsumexp(logits)^2 / T: this rank's share of the mean over all T tokens."""
    return logits.float().logsumexp(dim=-1).square().sum() / total_tokens


class Router(nn.Module):
    """Linear gate (E, hidden) without bias, computed in fp32; replicated over tp (and ep)."""

    def __init__(self, hidden_size: int, moe: MoEConfig, *, init_method, tp_group, sequence_parallel: bool):
        super().__init__()
        self.moe, self.tp_group, self.sequence_parallel = moe, tp_group, sequence_parallel
        weight = torch.empty(moe.num_experts, hidden_size)
        init_method(weight)
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor, with_losses: bool = True) -> Routing:
        moe, k = self.moe, self.moe.moe_router_topk
        weight = replicated_param(self.weight, self.tp_group, self.sequence_parallel)  # sums its grad over tp
        logits = F.linear(x.float(), weight.float())
        probs, weights, experts = topk_softmax(logits, k)
        # The micro-batch's tokens: under sequence parallelism this rank routes 1/tp of them.
        total = x.shape[0] * (dist.get_world_size(self.tp_group) if self.sequence_parallel else 1)
        loss, stats = self._losses(logits, probs, experts, total) if with_losses else (None, {})
        kept = None
        if moe.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], moe.num_experts, k, moe.moe_expert_capacity_factor)
            kept = capacity_mask(experts, weights, moe.num_experts, capacity, moe.moe_token_drop_policy)
            weights = weights * kept
            stats["dropped_fraction"] = (~kept).sum().detach() / (k * total)
        return Routing(experts, weights, kept, loss, stats)

    def _losses(self, logits, probs, experts, total: int):
        moe, stats, terms = self.moe, {}, []
        if moe.moe_aux_loss_coeff > 0:
            counts = torch.bincount(experts.flatten(), minlength=moe.num_experts)
            if self.sequence_parallel:
                comm.all_reduce(counts, self.tp_group)
            value = load_balancing_loss(probs, counts, total, moe.moe_router_topk)
            stats["load_balancing_loss"] = value.detach()
            terms.append(moe.moe_aux_loss_coeff * value)
        if moe.moe_z_loss_coeff > 0:
            value = z_loss(logits, total)
            stats["z_loss"] = value.detach()
            terms.append(moe.moe_z_loss_coeff * value)
        return (sum(terms) if terms else None), stats

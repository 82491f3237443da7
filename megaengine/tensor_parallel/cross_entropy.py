"""Cross entropy over vocabulary-sharded logits, without ever gathering the full vocabulary.

Each tp rank holds logits for its vocabulary range. Three scalars per token are reduced over tp: the max
(for a stable softmax), the sum of exponentials and the target's logit (found on exactly one rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaengine.parallel import comm
from megaengine.tensor_parallel.layers import resolve_group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        logits = logits.float()
        rank, per_rank = dist.get_rank(group), logits.shape[-1]
        start = rank * per_rank

        logits_max = logits.max(dim=-1).values
        comm.all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        outside = (target < start) | (target >= start + per_rank)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        comm.all_reduce(target_logit, group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, group)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the rank owning the target.
        # Out of place: a retained graph (split backward in zero-bubble schedules) may run this twice.
        grad = softmax.scatter_add(-1, local_target.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss (unreduced, float32) for logits split over the tp group along the last dim."""
    group = resolve_group(group)
    if dist.get_world_size(group) == 1:  # the whole vocabulary is here: torch's fused kernel
        flat = logits_shard.float().reshape(-1, logits_shard.shape[-1])
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits_shard, target, group)

"""A column-parallel linear on sequence shards that keeps only the shard for backward (Megatron-LM's
LinearWithGradAccumulationAndAsyncCommunication under sequence parallelism).

Forward: all-gather the (s/t, b, h) shards into (s, b, h), then y = x W^T + b. Saved for backward: the shard
and W, not the gathered input, so each column layer (QKV, fc1, the output layer) keeps t times less. Backward:
dX = dY W over the whole sequence, reduce-scattered into shards as before; dW = dY^T X needs the whole input
again, so the shard is all-gathered a second time (one more all-gather per layer per backward).

A pipeline's split backward (zero-bubble B, then W) asks for dX and for dW in separate passes; each pass
computes only the gradients the autograd engine will use, so B neither gathers nor computes dW, and W neither
computes dX nor reduce-scatters it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaengine.parallel import comm


def _used(ctx, i: int) -> bool:
    """Whether this backward pass needs the gradient of input i (x, weight, bias: the tensor inputs, listed in
    that order by next_functions) because the engine runs the node it flows into."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    return node is not None and torch._C._will_engine_execute_node(node)


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return F.linear(comm.all_gather_sequence(x, group, dim=0), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if _used(ctx, 0):
            grad_x = comm.reduce_scatter_sequence(g.matmul(weight), ctx.group, dim=0)
        g2 = g.reshape(-1, g.shape[-1])
        if _used(ctx, 1):
            full = comm.all_gather_sequence(x, ctx.group, dim=0)
            grad_w = g2.t().mm(full.reshape(-1, full.shape[-1]))
        if _used(ctx, 2):
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """all_gather_sequence(x) @ W^T + b, keeping only x's shard for backward."""
    # Inputs enter through views: the engine can tell whether it runs a view's node in autograd.grad() too,
    # which it cannot for a leaf's AccumulateGrad.
    return _GatheredLinear.apply(*(t if t is None else t.view_as(t) for t in (x, weight, bias)), group)

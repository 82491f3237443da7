"""Your own model from megaengine's parallel layers: a tensor-parallel residual MLP regressor.

    torchrun --nproc_per_node 4 examples/custom_model.py --tp 2      # tp=2 x dp=2 on CPU

The Megatron pattern in three lines: ColumnParallelLinear (output split over tp, no communication) ->
elementwise activation on the shard -> RowParallelLinear (partial sums all-reduced). The data-parallel
optimizer averages gradients over dp and steps AdamW.
"""
import argparse

import torch
import torch.distributed as dist
from torch import nn

from megaengine import parallel
from megaengine.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megaengine.zero.optimizer import ZeroOptimizer


class ParallelResidualMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int, tp_group):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm": nn.LayerNorm(dim),
                "up": ColumnParallelLinear(dim, hidden, group=tp_group),
                "down": RowParallelLinear(hidden, dim, group=tp_group),
            }) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](b["norm"](x))))
        return self.head(x).squeeze(-1)


def batch(step: int, dp_rank: int, size: int, dim: int):
    """A fixed target function; each dp rank draws its own samples, tp ranks of one replica the same."""
    g = torch.Generator().manual_seed(step * 1000 + dp_rank)
    x = torch.randn(size, dim, generator=g)
    return x, torch.sin(x[:, : dim // 2].sum(-1)) + 0.5 * x[:, dim // 2:].pow(2).mean(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    state = parallel.initialize(tp=args.tp)
    model = ParallelResidualMLP(dim=16, hidden=128, depth=3, tp_group=state.tp_group)
    opt = ZeroOptimizer([model], lr=3e-3, weight_decay=0.0, clip_grad=1.0,
                        dp_group=state.dp_group, tp_group=state.tp_group, pp_group=state.pp_group)
    for step in range(1, args.steps + 1):
        x, y = batch(step, state.dp_rank, 64, 16)
        opt.zero_grad()
        opt.set_is_last_microbatch(True)
        loss = nn.functional.mse_loss(model(x), y)
        opt.scale_loss(loss).backward()
        grad_norm, _ = opt.step()
        if step % 20 == 0 and dist.get_rank() == 0:
            print(f"step {step:4d} | mse {loss.item():.4f} | grad norm {grad_norm:.3f}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()

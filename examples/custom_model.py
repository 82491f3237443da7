"""Your own model from megaengine's parallel layers: a tensor-parallel residual MLP, trained with the ZeRO engine.

    torchrun --nproc_per_node 4 examples/custom_model.py --tp 2      # tp=2 x dp=2 on CPU

The Megatron pattern in three lines: ColumnParallelLinear (output split over tp, no communication) ->
elementwise activation on the shard -> RowParallelLinear (partial sums all-reduced). `megaengine.initialize`
wraps the model in DeepSpeed's engine interface: it averages gradients over dp and steps AdamW (ZeRO stage 2).

The task is to imitate a fixed random "teacher" network, which a small model learns in a few hundred steps:
the held-out MSE falls far below that of predicting the mean (the target's variance). Every tp layout starts
from the same weights, so at one dp rank the losses match tp=1 to rounding.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import megaengine
from megaengine import parallel
from megaengine.tensor_parallel import ColumnParallelLinear, RowParallelLinear

DIM, BATCH = 16, 64


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
        # GELU, not ReLU: a ReLU unit that switches on by a rounding error gets a full-size Adam step, after
        # which runs of different tp layouts drift apart; GELU keeps them equal to rounding.
        for b in self.blocks:
            x = x + b["down"](F.gelu(b["up"](b["norm"](x))))
        return self.head(x).squeeze(-1)


def teacher(x: torch.Tensor) -> torch.Tensor:
    """The function to learn: a two-layer tanh network with fixed random weights (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(x.shape[-1], 32, generator=g) / x.shape[-1] ** 0.5
    w2 = torch.randn(32, generator=g) / 32 ** 0.5
    return torch.tanh(x @ w1) @ w2


def batch(seed: int, size: int = BATCH):
    x = torch.randn(size, DIM, generator=torch.Generator().manual_seed(seed))
    return x, teacher(x)


def main(argv=None) -> tuple[float, list[float]]:
    """Train; return (predict-the-mean MSE, held-out MSE at step 0 and every log step)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--log-interval", type=int, default=20)
    args = ap.parse_args(argv)
    state = parallel.initialize(tp=args.tp)
    model = ParallelResidualMLP(DIM, hidden=128, depth=3, tp_group=state.tp_group)
    engine = megaengine.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 2}})
    x_test, y_test = batch(seed=-1, size=1024)  # held out: no training step uses this seed
    baseline = F.mse_loss(y_test.mean().expand_as(y_test), y_test).item()
    history = []

    def report(step: int):
        with torch.no_grad():
            history.append(F.mse_loss(engine(x_test), y_test).item())
        if dist.get_rank() == 0:
            print(f"step {step:4d} | held-out mse {history[-1]:.4f} | predict-the-mean mse {baseline:.4f}", flush=True)

    report(0)
    for step in range(1, args.steps + 1):
        x, y = batch(seed=step * 1000 + state.dp_rank)  # each dp rank its own samples, tp ranks the same
        engine.backward(F.mse_loss(engine(x), y))
        engine.step()
        if step % args.log_interval == 0:
            report(step)
    parallel.destroy()
    return baseline, history


if __name__ == "__main__":
    main()

"""The experts of one MoE layer held by this expert-parallel rank: E/ep MLPs stored as stacked weights and run
as grouped GEMMs (megaengine.kernels.grouped_gemm: Triton on CUDA, one padded batched matmul on CPU).

fc1 (local experts, 2 ffn, hidden) stacks [gate; up] as the dense SwiGLU MLP does (ffn rows without SwiGLU),
fc2 (local experts, hidden, ffn): each row of the stack is a torch.nn.Linear weight, no biases. Their global
shape has E in dim 0, split over ep; over tp they are replicated (no expert tensor parallelism), so under
sequence parallelism, where each tp rank feeds them other tokens, their gradients are summed over tp.
Expert e's weights come from a generator seeded by its global name, so every ep layout holds the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaengine.kernels.grouped_gemm import grouped_linear
from megaengine.moe.dispatch import group_size_rank
from megaengine.parallel.params import set_param_info
from megaengine.tensor_parallel.layers import replicated_param, seeded_init


def seeded_stack(seed: int, names: list[str], shape: tuple, std: float) -> torch.Tensor:
    """(len(names), *shape): each slice drawn from the generator seeded by its name, as gpt.seeded_init does."""
    out = torch.empty((len(names),) + tuple(shape))
    for name, piece in zip(names, out):
        seeded_init(seed, name, std)(piece)
    return out


class GroupedMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, *, layer_name: str, init_seed: int,
                 std: float, out_std: float, swiglu: bool = True, gelu_approximate: str = "none", ep_group=None,
                 tp_group=None, sequence_parallel: bool = False, backend: str | None = None):
        super().__init__()
        ep, rank = group_size_rank(ep_group)
        self.num_local = num_experts // ep
        self.first_expert = rank * self.num_local
        self.swiglu, self.gelu_approximate, self.backend = swiglu, gelu_approximate, backend
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        names = [f"{layer_name}.experts.{e}" for e in range(self.first_expert, self.first_expert + self.num_local)]
        fc1_rows = 2 * ffn_hidden_size if swiglu else ffn_hidden_size
        self.fc1 = nn.Parameter(seeded_stack(init_seed, [f"{n}.fc1" for n in names], (fc1_rows, hidden_size), std))
        self.fc2 = nn.Parameter(seeded_stack(init_seed, [f"{n}.fc2" for n in names], (hidden_size, ffn_hidden_size),
                                             out_std))
        for w in (self.fc1, self.fc2):  # experts stacked in dim 0, split over ep (reduced over expert_dp)
            set_param_info(w, ep_dim=0)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (rows, hidden) sorted by local expert, counts (local experts,) rows each."""
        fc1, fc2 = (replicated_param(w, self.tp_group, self.sequence_parallel) for w in (self.fc1, self.fc2))
        h = grouped_linear(x, fc1, counts, self.backend)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return grouped_linear(h, fc2, counts, self.backend)

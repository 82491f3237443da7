"""The MoE layer written the obvious way, token by token, over all E experts in one process: the oracle the
router, dispatchers and grouped experts are tested against (tests/test_moe_router.py, tests/distributed/test_moe.py).
Slow on purpose; nothing here is shared with the code under test except the tensors."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kept_reference(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
                   policy: str) -> torch.Tensor:
    """(T, k) bool: for each expert, its assignments in preference order ("probs": highest weight first,
    "position": token order; ties to the earlier token), the first `capacity` kept."""
    tokens, k = experts.shape
    kept = torch.zeros(tokens, k, dtype=torch.bool)
    for e in range(num_experts):
        chosen = [(t, j) for t in range(tokens) for j in range(k) if int(experts[t, j]) == e]
        if policy == "probs":
            chosen.sort(key=lambda tj: (-float(weights[tj]), tj[0]))
        for t, j in chosen[:capacity]:
            kept[t, j] = True
    return kept


def expert_mlp(x, fc1, fc2, swiglu: bool = True, gelu_approximate: str = "none"):
    h = fc1 @ x
    if swiglu:
        gate, up = h.chunk(2)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h, approximate=gelu_approximate)
    return fc2 @ h


def moe_reference(x, router_weight, fc1, fc2, topk: int, capacity_factor: float | None = None,
                  drop_policy: str = "probs", swiglu: bool = True, gelu_approximate: str = "none") -> dict:
    """x (T, hidden), router_weight (E, hidden), fc1 (E, 2 ffn | ffn, hidden), fc2 (E, hidden, ffn):
    {"out" (T, hidden), "experts", "weights", "kept", "load_balancing_loss", "z_loss"}."""
    tokens, num_experts = x.shape[0], router_weight.shape[0]
    logits = x @ router_weight.t()
    probs = logits.softmax(dim=-1)
    top, experts = probs.topk(topk, dim=-1)
    weights = top / top.sum(dim=-1, keepdim=True)
    kept = torch.ones(tokens, topk, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = math.ceil(tokens * topk / num_experts * capacity_factor)
        kept = kept_reference(experts, weights.detach(), num_experts, capacity, drop_policy)
    rows = []
    for t in range(tokens):
        y = x.new_zeros(x.shape[1])
        for j in range(topk):
            if kept[t, j]:
                e = int(experts[t, j])
                y = y + weights[t, j] * expert_mlp(x[t], fc1[e], fc2[e], swiglu, gelu_approximate)
        rows.append(y)
    fraction = torch.stack([(experts == e).sum() for e in range(num_experts)]).to(x.dtype) / (tokens * topk)
    return {"out": torch.stack(rows), "experts": experts, "weights": weights, "kept": kept,
            "load_balancing_loss": num_experts * (fraction * probs.mean(dim=0)).sum(),
            "z_loss": logits.logsumexp(dim=-1).pow(2).mean()}

"""What a Mixture-of-Experts MLP (megaengine/moe) adds to a plan: the bytes it keeps for backward and the
bytes its dispatch moves. Its parameters are listed with the rest (plan/memory.py).

Activations per MoE layer and micro-batch on one rank, walking moe/layer.py op by op as activations.py walks
the dense layer. T: the tokens this rank routes (s b, or s b / tp under sequence parallelism, which MoE needs
with tp > 1), k: top-k, E: experts, f: the expert ffn size, e: the activation element size, A: the (token,
expert) assignments this rank keeps, R: the rows its experts compute.

    router    its fp32 input T h 4 (a copy, or in fp32 runs the norm output itself), the softmax output T E 4,
              the top-k values and ids T k (4 + 8) and their sum T 4 (the renormalisation); with 16-bit
              weights the router weight's fp32 copy E h 4; z-loss: the logits again T E 4 and logsumexp T 4;
              load balancing: the expert counts E 4; either: the loss 4; capacity: the kept mask T k
    dispatch  int64 row indices: which token each kept assignment reads and where its result lands, 2 A 8;
              alltoall at ep > 1 also the arrived rows' sort order and its inverse, 2 R 8
    experts   as the dense MLP, on R rows: the grouped GEMMs' inputs and SwiGLU's intermediates R (h + 4f) e
              (GELU: 2f); bookkeeping: Triton keeps (E/ep + 1) int32 offsets per GEMM, the CPU torch path two
              int64 row indices per GEMM (4 R 8)
    combine   every (token, choice) output before the weighted sum, T k h e, and the weights in that dtype,
              T k e; allgather at ep > 1 combines the whole group's ep T tokens on every rank

Where this is approximate: A and R. Dropless, every rank sends A = k T and, on average over the ep group,
receives as much; the formula takes R = A = k T, as a balanced router gives. A rank whose experts are popular
keeps more (and the CPU torch path pads each local expert's rows to the busiest one's). With a capacity
factor c an expert keeps at most C = ceil(k T c / E) rows from each rank, so A = R = min(k T, E C): exact for
evenly spread routing, an upper bound on A otherwise.

Traffic per MoE layer and micro-batch on one rank (sent bytes, what the ring or the all-to-all moves):
    alltoall   forward the kept rows go out and their results come back, 2 A h e, less the 1/ep that stays
               on this rank when routing is even, and an all-gather of the per-expert counts (ep E int64);
               backward the rows again: 4 A h e (ep - 1) / ep + (ep - 1) E 8 in all.
    allgather  forward an all-gather of ep T tokens (h e), weights (4 k) and ids (8 k), and a reduce-scatter
               of ep T h e; backward a reduce-scatter of ep T (h e + 4 k) and an all-gather of ep T h e:
               (ep - 1) T (4 h e + 16 k) in all.
"""
from __future__ import annotations

import math

from megaengine.moe.config import expert_capacity, moe_mlp_parameters


def routed_rows(moe, tokens: float) -> float:
    """A = R: the assignments a rank keeps of its `tokens`, spread evenly (module docstring)."""
    rows = moe.moe_router_topk * tokens
    if moe.moe_expert_capacity_factor is None:
        return rows
    capacity = expert_capacity(math.ceil(tokens), moe.num_experts, moe.moe_router_topk,
                               moe.moe_expert_capacity_factor)
    return min(rows, moe.num_experts * capacity)


def moe_terms(config, tokens: float, *, ep: int, dtype_bytes: int, kernels) -> dict[str, float]:
    """Bytes one MoE MLP keeps for backward on one rank, per micro-batch, by origin (module docstring)."""
    moe, h, e, T = config.moe, config.hidden_size, dtype_bytes, tokens
    E, k, f = moe.num_experts, moe.moe_router_topk, moe.ffn_size(config.ffn_hidden_size)
    rows = routed_rows(moe, T)
    router = T * (h * 4 + E * 4 + k * 12 + 4) + (E * h * 4 if e != 4 else 0)
    if moe.moe_z_loss_coeff > 0:
        router += T * (E * 4 + 4)
    if moe.moe_aux_loss_coeff > 0:
        router += E * 4
    if moe.moe_z_loss_coeff > 0 or moe.moe_aux_loss_coeff > 0:
        router += 4
    if moe.moe_expert_capacity_factor is not None:
        router += T * k
    gathered = moe.moe_token_dispatcher_type == "allgather" and ep > 1
    alltoall = moe.moe_token_dispatcher_type == "alltoall" and ep > 1
    bookkeeping = 4 * rows * 8 if kernels.grouped_torch else 2 * (E // ep + 1) * 4
    return {"router": router, "dispatch indices": 2 * rows * 8 + alltoall * 2 * rows * 8,
            "experts": rows * (h + f * (4 if config.swiglu else 2)) * e + bookkeeping,
            "combine": (ep if gathered else 1) * T * k * (h + 1) * e}


def dispatch_bytes(config, tokens: float, *, ep: int, dtype_bytes: int) -> float:
    """Bytes one rank sends for one MoE layer's dispatch and combine, forward and backward, per micro-batch."""
    moe, h, e = config.moe, config.hidden_size, dtype_bytes
    if ep == 1:
        return 0.0
    if moe.moe_token_dispatcher_type == "allgather":
        return (ep - 1) * tokens * (4 * h * e + 16 * moe.moe_router_topk)
    return 4 * routed_rows(moe, tokens) * h * e * (ep - 1) / ep + (ep - 1) * moe.num_experts * 8


def replicated_numel(config, ep: int) -> int:
    """Elements of one MoE MLP on a rank, router and E/ep experts, all replicated over tp: under sequence
    parallelism their gradients are all-reduced over tp every micro-batch."""
    router = config.moe.num_experts * config.hidden_size
    experts = moe_mlp_parameters(config.hidden_size, config.ffn_hidden_size, config.moe, config.swiglu)["total"]
    return router + (experts - router) // ep

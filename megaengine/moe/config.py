"""The MoE settings (Megatron's flag dest names) and their validation against the model and the layout.

Torch-free, so flag parsing can check them before any process group exists.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from megaengine.errors import ConfigError

DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None  # None: the dense --ffn-hidden-size
    moe_aux_loss_coeff: float = 0.0  # Switch/GShard load balancing, E * sum_i f_i P_i
    moe_z_loss_coeff: float = 0.0  # ST-MoE router z-loss, mean(logsumexp(logits)^2)
    moe_expert_capacity_factor: float | None = None  # None: dropless
    moe_token_drop_policy: str = "probs"  # over capacity, keep the highest weights ("probs") or the first tokens
    moe_token_dispatcher_type: str = "alltoall"
    moe_layer_freq: int | tuple[int, ...] = 1  # every N-th layer is MoE (layer i when i % N == 0), or a 0/1 pattern

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig | None":
        """The MoE part of a flat preset or flag dict; None when it has no --num-experts."""
        if d.get("num_experts") is None:
            return None
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in d.items() if k in names and v is not None}
        if isinstance(kept.get("moe_layer_freq"), list):
            kept["moe_layer_freq"] = tuple(kept["moe_layer_freq"])
        return cls(**kept)

    def to_dict(self) -> dict:
        return asdict(self)

    def ffn_size(self, dense_ffn: int) -> int:
        return self.moe_ffn_hidden_size or dense_ffn


def moe_layer_pattern(num_layers: int, freq) -> list[bool]:
    """Which layers hold an MoE MLP (Megatron's --moe-layer-freq): an int N makes layers 0, N, 2N, ... MoE; a
    list gives one 0/1 per layer."""
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(num_layers)]
    return [bool(f) for f in freq]


def check_moe(moe: MoEConfig | None, *, num_layers: int, ep: int = 1, dp: int = 1, tp: int = 1,
              sequence_parallel: bool = False, add_bias_linear: bool = False) -> None:
    """Raise a ConfigError naming the flag for MoE settings that cannot be built or laid out. `dp` is the
    data-parallel size, world / (tp x pp x cp), out of which expert groups of `ep` ranks are carved. `moe` None (a
    dense model) only checks that no expert parallelism was asked for."""
    if moe is None:
        if ep != 1:
            raise ConfigError(f"--expert-model-parallel-size (--ep)={ep} needs experts: set --num-experts, or "
                              "drop --ep for a dense model.")
        return
    e, k = moe.num_experts, moe.moe_router_topk
    if not isinstance(e, int) or e < 1:
        raise ConfigError(f"--num-experts={e!r} must be an integer >= 1.")
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"--expert-model-parallel-size (--ep)={ep!r} must be an integer >= 1.")
    checks = [
        (1 <= k <= e, "--moe-router-topk", k, f"must be between 1 and --num-experts ({e}): each token picks k "
                                              "distinct experts"),
        (e % ep == 0, "--num-experts", e, f"must be divisible by --expert-model-parallel-size (--ep) {ep}, so "
                                          f"every expert-parallel rank holds the same number of experts; pick ep "
                                          f"among {_divisors(e)}"),
        (dp % ep == 0, "--expert-model-parallel-size (--ep)", ep,
         f"must divide the data-parallel size {dp} (world size / (tp x pp x cp)): expert groups are carved out of "
         f"the data-parallel ranks; pick ep among {_divisors(dp)} or launch a multiple of {ep} data-parallel ranks"),
        (tp == 1 or sequence_parallel, "--sequence-parallel", sequence_parallel,
         f"is required with --num-experts and tensor parallelism (tp={tp}), as in Megatron: each tp rank routes "
         "its own sequence shard. Add --sequence-parallel"),
        (not add_bias_linear, "--disable-bias-linear", False,
         "is required with --num-experts: the grouped expert MLPs have no biases (as Megatron's grouped GEMM "
         "and Mixtral)"),
        (moe.moe_expert_capacity_factor is None or moe.moe_expert_capacity_factor > 0,
         "--moe-expert-capacity-factor", moe.moe_expert_capacity_factor, "must be > 0, or unset for dropless"),
        (moe.moe_token_drop_policy in DROP_POLICIES, "--moe-token-drop-policy", moe.moe_token_drop_policy,
         f"choose one of {', '.join(DROP_POLICIES)}"),
        (moe.moe_token_dispatcher_type in DISPATCHERS, "--moe-token-dispatcher-type",
         moe.moe_token_dispatcher_type, f"choose one of {', '.join(DISPATCHERS)}"),
        (moe.moe_aux_loss_coeff >= 0, "--moe-aux-loss-coeff", moe.moe_aux_loss_coeff, "must be >= 0"),
        (moe.moe_z_loss_coeff >= 0, "--moe-z-loss-coeff", moe.moe_z_loss_coeff, "must be >= 0"),
        (moe.moe_ffn_hidden_size is None or moe.moe_ffn_hidden_size >= 1, "--moe-ffn-hidden-size",
         moe.moe_ffn_hidden_size, "must be >= 1"),
    ]
    for ok, flag, value, fix in checks:
        if not ok:
            raise ConfigError(f"{flag}={value} {fix}.")
    _check_layer_freq(moe.moe_layer_freq, num_layers)


def _check_layer_freq(freq, num_layers: int) -> None:
    if isinstance(freq, int):
        if freq < 1:
            raise ConfigError(f"--moe-layer-freq={freq} must be >= 1 (1: every layer is MoE).")
        return
    if len(freq) != num_layers or any(f not in (0, 1) for f in freq):
        raise ConfigError(f"--moe-layer-freq={list(freq)} as a pattern needs one 0 or 1 per layer "
                          f"(--num-layers {num_layers}).")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n <= 4096 else [1, n]


def expert_capacity(tokens: int, num_experts: int, topk: int, factor: float) -> int:
    """Megatron's capacity per expert: ceil(tokens x k / E x factor), tokens being the router's input here."""
    return math.ceil(tokens * topk / num_experts * factor)


def moe_mlp_parameters(hidden_size: int, ffn_hidden_size: int, moe: MoEConfig, swiglu: bool = True) -> dict:
    """One MoE MLP's weights: `total` (router + all E experts: memory) and `active` (router + the k experts each
    token uses: the ones model FLOPs count). All are matmul weights; experts have no biases."""
    per_expert = hidden_size * moe.ffn_size(ffn_hidden_size) * (3 if swiglu else 2)
    router = moe.num_experts * hidden_size
    return {"total": router + moe.num_experts * per_expert, "active": router + moe.moe_router_topk * per_expert}

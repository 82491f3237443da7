"""Mixture of Experts with expert parallelism: top-k router, all-to-all / all-gather token dispatch over an
expert-parallel group carved out of data parallelism (the mesh's ep_group), grouped-GEMM SwiGLU experts,
auxiliary losses."""
from megaengine.moe.config import MoEConfig, check_moe, expert_capacity, moe_layer_pattern, moe_mlp_parameters
from megaengine.moe.layer import MoEMLP, moe_layers, pop_moe_stats, set_aux_loss_scale

__all__ = ["MoEConfig", "MoEMLP", "check_moe", "expert_capacity", "moe_layer_pattern", "moe_layers",
           "moe_mlp_parameters", "pop_moe_stats", "set_aux_loss_scale"]

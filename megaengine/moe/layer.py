"""MoEMLP: the Mixture-of-Experts MLP that replaces the dense one, (seq, batch, hidden) in and out.

Router -> dispatcher (over the expert-parallel group) -> grouped experts -> combine. Under sequence
parallelism the input is this tp rank's sequence shard and so is the output, as for the dense MLP.

How the auxiliary losses reach the gradient: the coefficient-weighted load-balancing and z losses of a layer
are attached to its output by AuxLossBackward, an identity forward whose backward also seeds the loss's own
gradient with `aux_loss_scale`. The layer's losses thus get their gradient whenever the output does, on any
pipeline stage, inside any schedule (1F1B, interleaved, zero-bubble's split backward), without carrying extra
scalars through the pipeline to the last stage's loss (Megatron's MoEAuxLossAutoScaler; here the scale is
the layer's attribute rather than a global). The trainer must set it to what the main loss is multiplied by
before backward, loss scale / number of micro-batches, with `set_aux_loss_scale(model, scale)`. The values
(without coefficients) are accumulated per layer for the logs; `pop_moe_stats(model)` returns and resets them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaengine.moe.config import MoEConfig
from megaengine.moe.dispatch import DISPATCHERS
from megaengine.moe.experts import GroupedMLP
from megaengine.moe.router import Router
from megaengine.tensor_parallel.layers import seeded_init


class AuxLossBackward(torch.autograd.Function):
    """Identity on `output`; in backward, `loss` receives gradient `scale` as if it had been added to the loss."""

    @staticmethod
    def forward(ctx, output, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


class MoEMLP(nn.Module):
    """`config`: the model config (GPTConfig: hidden_size, ffn_hidden_size, num_layers, swiglu, gelu_approximate,
    init_method_std, init_seed, sequence_parallel); `moe`: the MoE settings; groups passed in explicitly."""

    def __init__(self, config, moe: MoEConfig, layer_name: str, tp_group, ep_group, *, backend: str | None = None):
        super().__init__()
        self.moe, self.aux_loss_scale = moe, 1.0
        std, sp = config.init_method_std, config.sequence_parallel
        self.router = Router(config.hidden_size, moe, init_method=seeded_init(config.init_seed, f"{layer_name}.router",
                                                                             std), tp_group=tp_group,
                             sequence_parallel=sp)
        self.experts = GroupedMLP(
            config.hidden_size, moe.ffn_size(config.ffn_hidden_size), moe.num_experts, layer_name=layer_name,
            init_seed=config.init_seed, std=std, out_std=std / math.sqrt(2 * config.num_layers),
            swiglu=config.swiglu, gelu_approximate=config.gelu_approximate, ep_group=ep_group, tp_group=tp_group,
            sequence_parallel=sp, backend=backend)
        self.dispatcher = DISPATCHERS[moe.moe_token_dispatcher_type](moe.num_experts, ep_group)
        self.stats: dict[str, torch.Tensor] = {}
        self.micro_batches = 0

    def forward(self, x: torch.Tensor, cp=None) -> torch.Tensor:
        """`cp`: the dense MLP's context-parallel argument; MoE layers refuse context parallelism when built."""
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        training = self.training and torch.is_grad_enabled()
        routing = self.router(tokens, with_losses=training)
        out = self.dispatcher(tokens, routing, self.experts).view(s, b, h)
        if training:
            self._record(routing.stats)
            if routing.loss is not None:
                out = AuxLossBackward.apply(out, routing.loss, self.aux_loss_scale)
        return out

    def _record(self, stats: dict) -> None:
        for name, value in stats.items():
            self.stats[name] = self.stats.get(name, 0.0) + value.float()
        self.micro_batches += 1


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient the layers' auxiliary losses get: what the main loss is multiplied by before backward."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = float(scale)


def pop_moe_stats(model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """(sum over this module's MoE layers of each statistic's mean over the micro-batches since the last call,
    number of MoE layers here), and reset. Values are this rank's shares: to log, sum over tp when sequence
    parallel, over pipeline stages, then divide by the total number of MoE layers and average over dp."""
    totals: dict[str, torch.Tensor] = {}
    layers = moe_layers(model)
    for layer in layers:
        for name, value in layer.stats.items():
            totals[name] = totals.get(name, 0.0) + value / max(1, layer.micro_batches)
        layer.stats, layer.micro_batches = {}, 0
    return totals, len(layers)

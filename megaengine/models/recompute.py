"""Activation recomputation (Megatron's --recompute-granularity, --recompute-method, --recompute-num-layers).

`checkpoint(fn, *args)` runs fn keeping only its inputs for backward; the backward runs fn again and uses what
the rerun saves (torch.utils.checkpoint, non-reentrant). The rerun sees the random state the forward saw, so
dropout masks come out identical: torch restores the default CPU/CUDA generators, and `_ReplayTPStream`
restores megaengine's tp-region stream (tensor_parallel.random), which lives outside torch's generators.

Non-reentrant checkpointing keeps the autograd graph of the region and recomputes per backward pass (per
graph task), so the pipeline's split backward (zero-bubble B, then W: pipeline/executor.py) works unchanged:
B reruns the region to get the input gradient, W reruns it again for the weight gradients it needs.

Policies, as in Megatron-Core's TransformerBlock:
- selective: the attention core (QK^T, softmax, dropout, @V) of every layer; its s x s tensors are the largest
  and cheapest to recompute (Korthikanti et al. 2022).
- full + uniform: the chunk's layers in groups of `num_layers`; only each group's input is kept.
- full + block: the first `num_layers` layers of the chunk one by one; the others keep everything.
Recomputation runs only when training with grad enabled.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from megaengine.tensor_parallel.random import get_tp_state, set_tp_state

GRANULARITIES = ("selective", "full")
METHODS = ("uniform", "block")


@dataclass(frozen=True)
class RecomputeConfig:
    """GPTConfig.recompute: Megatron's --recompute-granularity / --recompute-method / --recompute-num-layers."""
    granularity: str | None = None  # None (off), "selective" or "full"
    method: str | None = None  # with full: "uniform" (groups of num_layers) or "block" (the first num_layers)
    num_layers: int | None = None

    @property
    def selective(self) -> bool:
        return self.granularity == "selective"

    def describe(self) -> str:
        if self.granularity == "full":
            return f"full ({self.method}, {self.num_layers})"
        return self.granularity or "none"

    def checks(self, total_layers: int):
        """Megatron-Core's rules, as (ok, flag, value, fix) rows for GPTConfig.validate."""
        granularity, method, num_layers = self.granularity, self.method, self.num_layers
        full = granularity == "full"
        return [
            (granularity in (None,) + GRANULARITIES, "--recompute-granularity", granularity,
             "choose full or selective"),
            (method in (None,) + METHODS, "--recompute-method", method, "choose uniform or block"),
            (not full or method is not None, "--recompute-method", method,
             "must be set with --recompute-granularity full (uniform or block)"),
            (not full or (num_layers is not None and 1 <= num_layers <= total_layers), "--recompute-num-layers",
             num_layers, f"must be set with --recompute-granularity full, between 1 and --num-layers ({total_layers})"),
            (full or method is None, "--recompute-method", method,
             "applies to --recompute-granularity full only; drop it or use full"),
            (full or num_layers is None, "--recompute-num-layers", num_layers,
             "applies to --recompute-granularity full only; drop it or use full"),
        ]


class _ReplayTPStream:
    """Recompute context: run on the tp stream as it stood when the forward started, then put the live stream
    back. Entered once per recomputation (a split backward recomputes twice), so not a generator."""

    def __init__(self, start: dict):
        self.start, self.live = start, []

    def __enter__(self):
        self.live.append(get_tp_state())
        set_tp_state(self.start)

    def __exit__(self, *exc):
        set_tp_state(self.live.pop())


def _contexts():
    return contextlib.nullcontext(), _ReplayTPStream(get_tp_state())


def checkpoint(fn, *args):
    """fn(*args), keeping only `args` for backward, which recomputes the rest with the same randomness."""
    return torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)


def checkpoint_if(enabled: bool, fn, *args):
    return checkpoint(fn, *args) if enabled and torch.is_grad_enabled() else fn(*args)


def _chain(layers):
    def run(x, *rest):
        for layer in layers:
            x = layer(x, *rest)
        return x
    return run


def run_layers(layers, x, *rest, config: RecomputeConfig, training: bool):
    """x through `layers` (each called as layer(x, *rest)) with full recomputation as configured."""
    if config.granularity != "full" or not training or not torch.is_grad_enabled():
        return _chain(layers)(x, *rest)
    num_layers = config.num_layers
    if config.method == "uniform":
        for start in range(0, len(layers), num_layers):
            x = checkpoint(_chain(layers[start:start + num_layers]), x, *rest)
        return x
    for i, layer in enumerate(layers):
        x = checkpoint(layer, x, *rest) if i < num_layers else layer(x, *rest)
    return x

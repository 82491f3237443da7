"""Per-layer FP8 scaling state: current scaling (tensorwise, rowwise) and delayed scaling with an amax history.

A linear layer quantizes three operands, by slot: its input X, its weight W and the output gradient DY (the
gradient in the backward format). `quantize(t, slot, dim, shards, record)` returns the FP8 tensor and its
scale; `dim` is the dimension the matmul contracts (rowwise scales are per slice along the other one),
`shards` says how `t` is split over process groups (see cast.amax).

Delayed scaling (Transformer Engine's recipe, per tensor) takes the scale from the amaxes of earlier steps, so
the forward needs no amax reduction. Within one optimizer step the scale is fixed and every use (each
micro-batch, and a recomputed forward) folds its local amax into `pending` by max: a recomputed forward
therefore cannot count twice. `update_amax_history` runs once per step: one MAX all-reduce of all layers'
pending amaxes over the given groups (tp, then dp/cp: the scales become those of the whole global batch and
every layout agrees), then each history shifts in the new row and the scale is recomputed from it
(`amax_compute_algo` max: the largest in the window; most_recent: the new row), keeping the old scale where
the amax is zero or not finite, as TE does. Before a slot has any history (the first step, or a fresh model)
it is scaled like tensorwise current scaling rather than with TE's initial scale of 1, which would flush small
gradients to zero in e5m2. After the reduction the history is the same on every tp/dp rank.

Gradients are kept in one unit at every layout: each of the n data-parallel replicas (dp x cp) divides its
loss by its own share of the batch and the optimizer averages, so the gradients a rank sees are n times those
of the global batch's mean loss. `set_grad_divisor(modules, n)` says so; gradient amaxes then enter the history
divided by n, and the scale used is the kept one divided by n. Histories and scales are thus the same at
every dp size, and a checkpoint keeps one copy that reshards as a copy.
"""
from __future__ import annotations

import torch
from torch import nn

from megaengine.fp8.cast import Quantized, Shards, amax, amax_to_scale, cast_to_fp8, quantize
from megaengine.fp8.config import FP8Config
from megaengine.fp8.formats import FORMATS
from megaengine.parallel import comm

X, W, DY = 0, 1, 2
SLOTS = ("input", "weight", "grad_output")


def slot_formats(config: FP8Config):
    fwd, bwd = FORMATS[config.format]
    return fwd, fwd, bwd


class CurrentScaling(nn.Module):
    """tensorwise: one scale per tensor; rowwise: one per row of each matmul operand (torchao's recipes)."""

    def __init__(self, config: FP8Config):
        super().__init__()
        self.config, self.formats = config, slot_formats(config)
        self.per_tensor = config.recipe == "tensorwise"

    def quantize(self, t, slot: int, dim: int | None, shards: Shards = (), record: bool = False) -> Quantized:
        return quantize(t, self.formats[slot], None if self.per_tensor else dim, shards, self.config.margin)


class DelayedScaling(nn.Module):
    """amax history (history_len, 3 slots) and scales of one layer; fp32 whatever the model is cast to."""
    per_tensor = True

    def __init__(self, config: FP8Config):
        super().__init__()
        self.config, self.formats = config, slot_formats(config)
        self.register_buffer("amax_history", torch.zeros(config.amax_history_len, len(SLOTS)))
        self.register_buffer("scale", torch.ones(len(SLOTS)))
        self.register_buffer("pending", torch.zeros(len(SLOTS)), persistent=False)
        self.register_buffer("fp8_max", torch.tensor([f.max for f in self.formats]), persistent=False)
        self._warm: list[bool] | None = None  # per slot: has a history (None: read it off the buffer)
        self.units = (1.0, 1.0, 1.0)  # per slot: local values per unit of the history (set_grad_divisor)

    @property
    def warm(self) -> list[bool]:
        if self._warm is None:
            self._warm = (self.amax_history.amax(0) > 0).tolist()
        return self._warm

    def quantize(self, t, slot: int, dim: int | None, shards: Shards = (), record: bool = False) -> Quantized:
        fmt, unit = self.formats[slot], self.units[slot]
        if self.warm[slot]:
            scale = self.scale[slot] / unit  # a new tensor: the backward must see this step's scale
            local = amax(t) if record else None
        else:
            local = amax(t, None, shards)
            scale = amax_to_scale(local, fmt, self.config.margin)
        if record:
            self.pending[slot] = torch.maximum(self.pending[slot], local / unit)
        return Quantized(cast_to_fp8(t, scale, fmt), scale)

    def push(self, new_amax: torch.Tensor) -> None:
        """Shift `new_amax` (3,) into the history (row 0 is the newest) and recompute the scales."""
        self.amax_history.copy_(torch.cat([new_amax[None], self.amax_history[:-1]]))
        self.scale.copy_(next_scale(self.amax_history, self.scale, self.fp8_max, self.config.amax_compute_algo,
                                    self.config.margin))
        self.pending.zero_()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round amaxes and scales: buffers follow device moves only
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(device=fn(buf[:0]).device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "amax_history"
        if key in state_dict:  # a changed --fp8-amax-history-len keeps the newest rows (load_state_dict copies)
            saved, n = state_dict[key], self.amax_history.shape[0]
            state_dict[key] = torch.cat([saved[:n], saved.new_zeros(max(0, n - saved.shape[0]), saved.shape[1])])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._warm = None


def next_scale(history: torch.Tensor, scale: torch.Tensor, fp8_max: torch.Tensor, algo: str,
               margin: int) -> torch.Tensor:
    a = history.amax(0) if algo == "max" else history[0]
    new = fp8_max / a / 2.0 ** margin
    return torch.where((a > 0) & torch.isfinite(a), new, scale)


def make_scaling(config: FP8Config) -> nn.Module:
    return DelayedScaling(config) if config.recipe == "delayed" else CurrentScaling(config)


def set_grad_divisor(modules, n: float) -> None:
    """The gradients reaching these modules' FP8 layers are `n` times those of the global batch's mean loss (n:
    the data-parallel replicas, dp x cp, each dividing its loss by its own share). Call once, after building
    the model and before its first step (also before a checkpoint's first step)."""
    for m in _delayed(modules):
        m.units = (1.0, 1.0, float(n))


def _delayed(modules) -> list:
    return [m for module in modules for m in module.modules() if isinstance(m, DelayedScaling)]


def update_amax_history(modules, groups=()) -> None:
    """Once per optimizer step, after the last backward: reduce every DelayedScaling's pending amaxes (one MAX
    all-reduce per group, all layers at once) and advance the histories. `modules`: the model chunks of this
    rank (every rank of a group must hold the same layers in the same order, as tp/dp/cp peers do)."""
    states = _delayed(modules)
    if not states:
        return
    pending = torch.stack([s.pending for s in states])
    for group in groups:
        comm.all_reduce_max(pending, group)
    for s, row in zip(states, pending):
        s.push(row)
    warm = (torch.stack([s.amax_history.amax(0) for s in states]) > 0).tolist()  # one sync for all
    for s, w in zip(states, warm):
        s._warm = w

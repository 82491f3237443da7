"""Learning-rate schedules: Megatron's (linear warmup from 0, then constant, linear or cosine decay to min_lr)
and DeepSpeed's (WarmupLR, WarmupDecayLR, WarmupCosineLR), as pure functions of the iteration, so resuming
needs nothing but the iteration number. `lr_schedule(optim)` picks the one an OptimConfig asks for.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from megaengine.zero.config import SchedulerConfig


def learning_rate(iteration: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                  style: str) -> float:
    """LR for `iteration` (0-based count of completed steps)."""
    if warmup_iters > 0 and iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if style == "constant":
        return lr
    if iteration >= decay_iters:
        return min_lr
    progress = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        coeff = 1.0 - progress
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    else:
        raise ValueError(f"unknown lr decay style {style!r}")
    return min_lr + coeff * (lr - min_lr)


def scheduler_lr(sched: SchedulerConfig, base_lr: float, iteration: int) -> float:
    """DeepSpeed's learning rate at `last_batch_iteration` = iteration (-1 before the first step)."""
    if sched.type is None:
        return base_lr
    p = sched.params
    warm = max(2, int(p.get("warmup_num_steps", 1000)))
    linear = p.get("warmup_type", "log") == "linear"

    def warm_gamma(it):
        return it / warm if linear else math.log(it + 1) / math.log(warm)

    if sched.type == "WarmupCosineLR":
        if iteration < 0:
            return 0.0
        if iteration < warm:
            low = float(p.get("warmup_min_ratio", 0.0))
            return base_lr * (low + warm_gamma(iteration) * (1 - low))
        total = int(p["total_num_steps"])
        progress = min(1.0, (iteration - warm + 1) / max(1, total - warm))
        low = float(p.get("cos_min_ratio", 0.0001))
        return base_lr * max(0.0, low + (1 - low) * (1 + math.cos(math.pi * progress)) / 2)
    low = float(p.get("warmup_min_lr", 0.0))
    high = float(p.get("warmup_max_lr", base_lr if sched.type == "WarmupLR" else 0.001))
    if iteration < 0:
        return low
    if iteration < warm:
        gamma = warm_gamma(iteration)
    elif sched.type == "WarmupDecayLR":
        total = int(p["total_num_steps"])
        gamma = max(0.0, (total - iteration) / max(1.0, total - warm))
    else:
        gamma = 1.0
    return low + (high - low) * gamma


def lr_schedule(optim) -> Callable[[int], float]:
    """iteration (completed steps) -> LR: the DeepSpeed scheduler when the JSON gave one, else Megatron's."""
    if optim.scheduler.type:
        return lambda it: scheduler_lr(optim.scheduler, optim.lr, it)
    return lambda it: learning_rate(it, lr=optim.lr, min_lr=optim.min_lr, warmup_iters=optim.lr_warmup_iters,
                                    decay_iters=optim.lr_decay_iters, style=optim.lr_decay_style)

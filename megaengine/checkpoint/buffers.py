"""A model's persistent buffers in checkpoints (today: FP8 delayed scaling's amax histories and scales).

They are not parameters (no optimizer state, no tp split): after FP8's per-step MAX reduction each is the same
on every tp and dp x cp rank of its pipeline stage, so a checkpoint keeps one whole copy under the buffer's
global name, and any layout takes it back by name.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def named_buffers(module: nn.Module, global_name: Callable[[str], str] = str) -> list[tuple[str, torch.Tensor]]:
    """(global name, buffer) of every buffer `module` saves in its state_dict (non-persistent ones left out);
    `global_name` maps a name in `module` to its name in the whole model (default: the same)."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return [(global_name(name), t) for name, t in module.state_dict(keep_vars=True).items() if name not in params]


def load_buffers(module: nn.Module, saved: dict, global_name: Callable[[str], str] = str) -> None:
    """Copy into `module` the buffers `saved` ({global name: tensor}) holds; the others keep their values. The
    module's own loading rules apply (an FP8 history of another length keeps the newest rows)."""
    own = {name: saved[key] for name, key in ((n, global_name(n)) for n, _ in named_buffers(module)) if key in saved}
    if own:
        module.load_state_dict(own, strict=False)

"""Measure what autograd keeps for backward: bytes of the distinct storages packed by saved-tensor hooks.

A storage saved twice (or through two views) counts once; parameters (and views of them) are weights, not
activations, and are left out. Inside a recomputed region torch's checkpoint installs its own hooks, so only
what the region really keeps (its inputs) is seen: the count is what stays in memory between forward and
backward. The predictions in plan/activations.py are checked against these counts.
"""
from __future__ import annotations

import torch


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """with SavedBytes(model.parameters()) as saved: loss = model(x) -> saved.total (bytes)."""

    def __init__(self, params=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}  # data_ptr -> nbytes; the graph keeps them alive, so no reuse
        super().__init__(self._pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.exclude:
            self.storages.setdefault(key, storage.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def chunk_saved_bytes(chunk, x: torch.Tensor, labels: torch.Tensor | None = None) -> int:
    """Bytes one forward of a GPT chunk keeps for backward (x: token ids or the received activation)."""
    with SavedBytes(chunk.parameters()) as saved:
        out = chunk(x, labels)
    del out
    return saved.total


def layer_saved_bytes(config, tp_group, *, seq: int, micro_batch: int, dtype: torch.dtype, per: int = 1,
                      ep_group=None) -> float:
    """Bytes one transformer layer keeps: a middle pipeline chunk of 2 x `per` layers minus one of `per` layers
    (so nothing but layers is counted), divided by `per` (the recompute group size with the uniform method).
    `ep_group`: where an MoE layer's experts live."""
    import torch.distributed as dist

    from megaengine.models import GPT
    tp = dist.get_world_size(tp_group)
    rows = seq // tp if config.sequence_parallel else seq
    counts = []
    for n in (per, 2 * per):
        chunk = GPT(config, tp_group, layers=(0, n), pre_process=False, post_process=False,
                    ep_group=ep_group).to(dtype)
        chunk.train()
        x = torch.randn(rows, micro_batch, config.hidden_size, dtype=dtype, requires_grad=True)
        counts.append(chunk_saved_bytes(chunk, x))
    return (counts[1] - counts[0]) / per

"""Layout-independent weight initialisation that draws only the piece a rank keeps.

A weight's rows are cut into fixed blocks of `BLOCK` rows, and block i is drawn from its own generator seeded
by (seed, weight name, i). The full tensor is therefore the same whatever draws it, and a tensor-parallel
shard draws only the blocks it holds: a column-parallel shard (a set of row ranges) draws just those rows; a
row-parallel shard (a column range) draws each block and keeps its columns, so the transient is one block.
No rank ever materialises a whole weight it does not keep (the vocabulary embedding of a large model at tp 8
would otherwise be built 8 times over on every rank).

`seeded_init(...)` is an init method for the tensor-parallel layers (tensor_parallel/layers.py): called
on a full tensor it fills it; its `piece(shape, rows, cols)` returns the part of the full tensor at those
row ranges and column range, which is what the layers ask for.
"""
from __future__ import annotations

import zlib

import torch

BLOCK = 64  # rows per generator


class SeededInit:
    """Normal(0, std) weights from per-row-block generators; rows at or beyond `rows` (vocabulary padding,
    which grows with tp) are zero."""

    def __init__(self, seed: int, name: str, std: float, rows: int | None = None):
        self.base = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32
        self.std, self.rows = std, rows

    def _block(self, i: int, width: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.base + (i << 32))
        return torch.randn((BLOCK, width), generator=g) * self.std

    def piece(self, shape, rows=None, cols=None) -> torch.Tensor:
        """full[rows][:, cols] of a full tensor of `shape` (2-D), drawing only the blocks it overlaps.
        rows: [(start, stop)] ranges of dim 0, concatenated in order (None: all); cols: (start, stop) or None."""
        n, width = shape
        rows = [(0, n)] if rows is None else rows
        c0, c1 = cols or (0, width)
        real = n if self.rows is None else self.rows
        out = torch.zeros(sum(b - a for a, b in rows), c1 - c0)
        at = 0
        for a, b in rows:
            for i in range(a // BLOCK, -(-min(b, real) // BLOCK)):
                lo, hi = max(a, i * BLOCK), min(b, real, (i + 1) * BLOCK)
                if lo < hi:
                    block = self._block(i, width)
                    out[at + lo - a:at + hi - a] = block[lo - i * BLOCK:hi - i * BLOCK, c0:c1]
            at += b - a
        return out

    def __call__(self, t: torch.Tensor) -> None:
        with torch.no_grad():
            t.copy_(self.piece(tuple(t.shape)).view_as(t))


def seeded_init(seed: int, name: str, std: float, rows: int | None = None) -> SeededInit:
    return SeededInit(seed, name, std, rows)

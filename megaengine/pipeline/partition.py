"""Which layers each pipeline rank holds: an even split, with virtual stages for the interleaved schedule.

Chunk c on rank r is virtual stage c * pp + r (Megatron's layout), so rank r holds every pp-th slice of the
model and an activation leaving the last rank re-enters rank 0 at its next chunk.
"""
from __future__ import annotations

from megaengine.parallel.mesh import ConfigError


def layer_ranges(num_layers: int, pp: int, virtual_stages: int = 1) -> list[list[tuple[int, int]]]:
    """[rank][chunk] -> (start, end) layer indices, end exclusive."""
    if pp < 1 or virtual_stages < 1:
        raise ConfigError(f"--pipeline-model-parallel-size ({pp}) and the virtual stages per rank "
                          f"({virtual_stages}) must be >= 1.")
    stages = pp * virtual_stages
    if num_layers % stages:
        other = (f", or a --num-layers-per-virtual-pipeline-stage that divides the {num_layers // pp} layers per "
                 "rank") if num_layers % pp == 0 else ""
        raise ConfigError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"{virtual_stages} virtual stages = {stages}. Choose --num-layers as a multiple of {stages}{other}.")
    per = num_layers // stages
    return [[((c * pp + r) * per, (c * pp + r + 1) * per) for c in range(virtual_stages)] for r in range(pp)]

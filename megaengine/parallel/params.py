"""One typed record per parameter: the sharding facts that gradient clipping, ZeRO and checkpoints need.

A record is set where the parameter is made (the tensor-parallel layers, the GPT's tied embeddings) and by
ZeRO-3 when it takes the storage away; everything else reads it through `param_info(p)`. A parameter nobody
marked is replicated over tp, untied, and has the shape it shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

_ATTR = "_megaengine_param_info"


@dataclass(frozen=True)
class ParamInfo:
    # The dim split over the tp group; None: the same tensor on every tp rank.
    tp_dim: int | None = None
    # Full sizes of the parts stacked along tp_dim ([q; k; v], SwiGLU's [gate; up]): each is split separately.
    tp_segments: tuple[int, ...] | None = None
    # Global length along tp_dim that holds real rows; the rest is padding (the vocabulary, padded with tp).
    tp_unpadded: int | None = None
    # Pipeline-tied word embedding: "embedding" on the first stage, "copy" for its twin on the last stage.
    tied: str | None = None
    # The parameter's shape while ZeRO-3 keeps only a flat shard and the tensor itself is empty.
    full_shape: tuple[int, ...] | None = None
    # The ZeRO-3 unit (a zero.buffers.Bucket holding this rank's shard) when the model was built sharded
    # (megaengine.zero_init); the optimizer adopts it instead of packing the parameter itself.
    zero_unit: object | None = field(default=None, compare=False, repr=False)
    # MoE experts: the dim (stacked experts) split over the expert-parallel group, ep rank r holding the r-th
    # block. Such a parameter is a replica only among the ranks holding the same experts (expert_dp), so its
    # gradient is reduced and its ZeRO state sharded over expert_dp instead of dp (still averaged over dp).
    ep_dim: int | None = None

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_dim is not None

    @property
    def expert_parallel(self) -> bool:
        return self.ep_dim is not None

    @property
    def is_tied_copy(self) -> bool:
        """The last stage's twin: its gradient and state are the first stage's, so it is counted once."""
        return self.tied == "copy"


_DEFAULT = ParamInfo()


def param_info(p: torch.Tensor) -> ParamInfo:
    return p.__dict__.get(_ATTR, _DEFAULT)


def set_param_info(p: torch.Tensor, **changes) -> ParamInfo:
    """Update some fields of `p`'s record (the others keep their values)."""
    info = replace(param_info(p), **changes)
    setattr(p, _ATTR, info)
    return info


def mark_tensor_parallel(p: torch.Tensor, dim: int, segments: Sequence[int] | None = None,
                         unpadded: int | None = None) -> None:
    set_param_info(p, tp_dim=dim, tp_segments=tuple(segments) if segments else None, tp_unpadded=unpadded)


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape, also while ZeRO-3 holds it as a shard."""
    return param_info(p).full_shape or tuple(p.shape)

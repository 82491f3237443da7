"""Megatron-style tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Each layer takes its tp group (None: the initialised one). A shard is exactly the piece of the weight that the
same seed creates at tp=1, so every layout is comparable with the single-process model: an init method with
a `piece(shape, rows, cols)` (`seeded_init`, tensor_parallel/init.py) draws only that piece; any other is run
on the whole weight, which is then sliced. Each shard's split is recorded in its `ParamInfo`
(megaengine.parallel.params), which gradient clipping, ZeRO and checkpoints read.

`fp8=FP8Config(...)` makes the column and row layers run their matmuls in FP8 (megaengine.fp8); the layer then
holds its scaling state as the submodule `fp8`.

Sequence parallelism (Korthikanti et al. 2022): activations outside these layers are split along dim 0 (the
sequence, layout (seq, batch, hidden)); the column layer all-gathers them (keeping only the shard for
backward), the row layer reduce-scatters.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaengine.parallel import comm
from megaengine.parallel.params import mark_tensor_parallel, param_info
from megaengine.tensor_parallel.init import seeded_init  # noqa: F401 (the layers' seeded init, used by models)
from megaengine.tensor_parallel.sequence_linear import gathered_linear

InitMethod = Callable[[torch.Tensor], None]


def resolve_group(group):
    """`group=None` means the tp group of the initialised parallel state."""
    if group is not None:
        return group
    from megaengine.parallel import get_state
    return get_state().tp_group


def normal_init(std: float = 0.02) -> InitMethod:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def shard_rows(full: torch.Tensor, rank: int, size: int, segments: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's slice along dim 0. With `segments`, dim 0 is a concatenation of parts (q, k, v or
    gate, up) and each part is split separately, so every rank holds a matching piece of each."""
    parts = full.split(list(segments)) if segments else [full]
    return torch.cat([p.chunk(size, dim=0)[rank] for p in parts], dim=0)


def take_shard(full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The piece of a full tensor that `param` (a shard marked by its layer) holds on tp rank `rank`."""
    info = param_info(param)
    if not info.tensor_parallel:
        return full
    dim = info.tp_dim
    return shard_rows(full.movedim(dim, 0), rank, size, info.tp_segments).movedim(0, dim)


def make_fp8(config):
    """The FP8 scaling state of a layer (None: FP8 off)."""
    if config is None:
        return None
    from megaengine.fp8.scaling import make_scaling
    return make_scaling(config)


def linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None, parallel: str,
           token_group=None) -> torch.Tensor:
    """x W^T (+ bias) for a "column" or "row" layer: F.linear, or the FP8 linear when the layer has FP8 state
    (which then needs to know which operands are sharded over the layer's group, and the group x's tokens are
    split over, if any: context parallelism)."""
    if layer.fp8 is None:
        return F.linear(x, layer.weight, bias)
    from megaengine.fp8.linear import fp8_linear
    return fp8_linear(x, layer.weight, bias, scaling=layer.fp8, group=layer.group, parallel=parallel,
                      token_group=token_group)


def row_ranges(rows: int, rank: int, size: int, segments: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The ranges of dim 0 that `shard_rows` keeps, in order."""
    out, start = [], 0
    for part in (list(segments) if segments else [rows]):
        k = part // size
        out.append((start + rank * k, start + (rank + 1) * k))
        start += part
    return out


def _create(shape, init_method: InitMethod, dtype, device, *, rows=None, cols=None) -> torch.Tensor:
    """full[rows ranges][:, cols] of the weight `init_method` makes (float32, then cast)."""
    if hasattr(init_method, "piece"):
        t = init_method.piece(shape, rows, cols)
    else:
        full = torch.empty(shape, dtype=torch.float32)
        init_method(full)
        t = torch.cat([full[a:b] for a, b in rows]) if rows else full
        t = t[:, cols[0]:cols[1]] if cols else t
    return t.to(dtype=dtype, device=device).contiguous()


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dimension: each rank computes out/tp features.

    `segments` (optional) lists the sizes of the parts stacked in the output dimension (e.g. q, k, v); each
    part is split over tp separately. `gather_output` all-gathers the result; otherwise it stays sharded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, group=None, *, init_method: InitMethod | None = None,
                 segments: Sequence[int] | None = None, fp8=None, dtype=torch.float32, device=None):
        super().__init__()
        self.group = resolve_group(group)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        parts = list(segments) if segments else [out_features]
        if sum(parts) != out_features or any(p % size for p in parts):
            raise ValueError(f"output size {out_features} (parts {parts}) must split evenly over tp={size}")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output with sequence_parallel is not supported")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        init_method = init_method or normal_init()
        self.weight = nn.Parameter(_create((out_features, in_features), init_method, dtype, device,
                                           rows=row_ranges(out_features, rank, size, segments)))
        mark_tensor_parallel(self.weight, 0, segments)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // size, dtype=dtype, device=device))
            mark_tensor_parallel(self.bias, 0, segments)
        else:
            self.register_parameter("bias", None)
        self.fp8 = make_fp8(fp8)

    def forward(self, x: torch.Tensor, token_group=None) -> torch.Tensor:
        """`token_group`: the group x's tokens are split over (context parallel), for FP8's amaxes over tokens."""
        if self.sequence_parallel and self.fp8 is None:  # keeps x's shard for backward (sequence_linear.py)
            y = gathered_linear(x, self.weight, self.bias, self.group)
        else:
            if self.sequence_parallel:
                x = comm.all_gather_sequence(x, self.group, dim=0)
            else:
                x = comm.copy_to_tp_region(x, self.group)
            y = linear(x, self, self.bias, "column", token_group)
        return comm.gather_from_tp_region(y, self.group, dim=-1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dimension: partial products summed over tp, bias added
    once after the sum (reduce-scattered into sequence shards when sequence parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, group=None, *, init_method: InitMethod | None = None,
                 fp8=None, dtype=torch.float32, device=None):
        super().__init__()
        self.group = resolve_group(group)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if in_features % size:
            raise ValueError(f"input size {in_features} must split evenly over tp={size}")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        init_method = init_method or normal_init()
        k = in_features // size
        self.weight = nn.Parameter(_create((out_features, in_features), init_method, dtype, device,
                                           cols=(rank * k, (rank + 1) * k)))
        mark_tensor_parallel(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.fp8 = make_fp8(fp8)

    def forward(self, x: torch.Tensor, token_group=None) -> torch.Tensor:
        """`token_group`: as for ColumnParallelLinear."""
        if dist.get_world_size(self.group) == 1:  # nothing to reduce: the bias goes into the GEMM
            return linear(x, self, self.bias, "row", token_group)
        if not self.input_is_parallel:
            x = comm.scatter_to_tp_region(x, self.group, dim=-1)
        y = linear(x, self, None, "row", token_group)
        if self.sequence_parallel:
            y = comm.reduce_scatter_sequence(y, self.group, dim=0)
        else:
            y = comm.reduce_from_tp_region(y, self.group)
        if self.bias is None:
            return y
        return y + replicated_param(self.bias, self.group, self.sequence_parallel)


def replicated_param(p: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """A replicated parameter used on sequence shards gets only its shard's gradient on each rank; routing it
    through copy_to_tp_region sums those partial gradients over tp in backward."""
    return comm.copy_to_tp_region(p, group) if sequence_parallel else p


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp: each rank looks up the ids in its range, zeros the rest,
    and the partial results are summed (reduce-scattered over dim 0 when `sequence_parallel`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, *, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, dtype=torch.float32, device=None):
        super().__init__()
        self.group = resolve_group(group)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if num_embeddings % size:
            raise ValueError(f"vocabulary {num_embeddings} must split evenly over tp={size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        per_rank = num_embeddings // size
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = nn.Parameter(_create((num_embeddings, embedding_dim), init_method or normal_init(), dtype,
                                           device, rows=[(self.vocab_start, self.vocab_end)]))
        mark_tensor_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_start == 0 and self.vocab_end == self.num_embeddings:  # tp = 1: nothing to mask or sum
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_sequence(out, self.group, dim=0)
        return comm.reduce_from_tp_region(out, self.group)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: a multiple of make_vocab_size_divisible_by x tp."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)

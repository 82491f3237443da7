"""Where a rank's tensors sit in the global ones, and reading boxes of global tensors back.

A parameter shard is saved as boxes of global tensors named as in the whole model. A fused parameter ([q; k;
v], SwiGLU's [gate; up]) has each part split over tp separately, so it is saved as its parts `<name>#0`,
`<name>#1`, ...: then every piece a rank holds is one box. Padding rows (the vocabulary's, which grow with tp)
are not saved. MoE experts, stacked along `ParamInfo.ep_dim` and split over ep, are boxes of the tensor of all
experts, so a checkpoint reshards across ep as across tp. All of this is read off each parameter's `ParamInfo`.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch

from megaengine.checkpoint.store import META, load_data_file
from megaengine.errors import ConfigError
from megaengine.parallel.params import full_shape, param_info

FORMAT = 2  # 1 (no "format" key): one pickled state per rank, loadable at the same layout only


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class Piece:
    """A box of global tensor `key` held by a rank: it starts at `offsets` and spans `sizes`; in the rank's own
    tensor it is `length` entries from `start` along `dim`."""
    key: str
    global_shape: tuple
    offsets: tuple
    sizes: tuple
    dim: int
    start: int
    length: int

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.dim, self.start, self.length)


def _box(key: str, local_shape: tuple, dim: int, global_len: int, offset: int, start: int, length: int) -> Piece:
    def along(value, other):
        return tuple(value if i == dim else s for i, s in enumerate(other))
    return Piece(key, along(global_len, local_shape), along(offset, (0,) * len(local_shape)),
                 along(length, local_shape), dim, start, length)


def param_pieces(name: str, local_shape, *, tp_dim: int | None = None, segments=None, tp_rank: int = 0,
                 tp_size: int = 1, unpadded: int | None = None, ep_dim: int | None = None, ep_rank: int = 0,
                 ep_size: int = 1) -> list[Piece]:
    """The boxes of global tensors that a rank's (tp-local) parameter holds. `tp_dim` None: replicated.
    `segments`: the fused parts' full sizes, each split over tp. `unpadded`: entries past it along tp_dim are
    padding. `ep_dim`: the experts' dim, split over ep (experts are not split over tp)."""
    shape = tuple(local_shape)
    if ep_dim is not None:
        n = shape[ep_dim]
        return [_box(name, shape, ep_dim, n * ep_size, ep_rank * n, 0, n)]
    if tp_dim is None:
        return [_box(name, shape, 0, shape[0], 0, 0, shape[0])]
    d = tp_dim
    if segments:
        pieces, start = [], 0
        for i, seg in enumerate(segments):
            n = seg // tp_size
            pieces.append(_box(f"{name}#{i}", shape, d, seg, tp_rank * n, start, n))
            start += n
        return pieces
    n = shape[d]
    if unpadded is None:
        return [_box(name, shape, d, n * tp_size, tp_rank * n, 0, n)]
    length = max(0, min(n, unpadded - tp_rank * n))
    return [_box(name, shape, d, unpadded, tp_rank * n, 0, length)] if length else []


@dataclass
class Held:
    """A parameter this rank holds, under its name in the whole model."""
    name: str
    param: torch.Tensor
    shape: tuple  # the parameter's (tp-local) shape, also while ZeRO-3 holds only a shard
    pieces: list
    replicated: bool  # the same on every tp rank
    tied_copy: bool  # the last stage's copy of tied embeddings: saved once, by the first stage
    expert: bool = False  # MoE experts: held by the expert-data-parallel replicas only


def held_params(named_params, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1) -> list[Held]:
    """`named_params`: (global name, parameter) pairs of everything this rank holds."""
    out, seen = [], set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        info, shape = param_info(p), full_shape(p)
        pieces = param_pieces(name, shape, tp_dim=info.tp_dim, segments=info.tp_segments, tp_rank=tp_rank,
                              tp_size=tp_size, unpadded=info.tp_unpadded, ep_dim=info.ep_dim, ep_rank=ep_rank,
                              ep_size=ep_size)
        out.append(Held(name, p, shape, pieces, not info.tensor_parallel, info.is_tied_copy, info.expert_parallel))
    return out


class PieceReader:
    """Reads boxes of global tensors out of one checkpoint directory, checking each file and piece against the
    index (size, dtype, shape, crc32) so that damage is reported, not loaded."""

    def __init__(self, path: str, meta: dict):
        self.path, self.index, self.files = path, meta.get("tensors", {}), meta.get("files", {})
        self.meta_path = os.path.join(path, META)
        if meta.get("format", 1) != FORMAT:
            raise ConfigError(f"{self.meta_path}: checkpoint format {meta.get('format', 1)}, this megaengine reads "
                              f"format {FORMAT}; load it with the megaengine version that wrote it.")
        self.opened: dict = {}
        self.verified: set = set()

    def entry(self, name: str) -> dict:
        if name not in self.index:
            raise ConfigError(f"{self.meta_path}: the checkpoint has no tensor {name}; was it saved from another "
                              "model (see `python -m megaengine.tools.checkpoint inspect`)?")
        return self.index[name]

    def _file(self, file: str) -> dict:
        if file not in self.opened:
            path = os.path.join(self.path, file)
            size, expected = os.path.getsize(path) if os.path.exists(path) else None, self.files.get(file)
            if size is not None and expected is not None and size != expected:
                raise ConfigError(f"{path}: {size} bytes, but {expected} were written; the file is truncated or "
                                  "was replaced.")
            self.opened[file] = load_data_file(path, mmap=True)
        return self.opened[file]

    def _piece(self, name: str, entry: dict, piece: dict) -> torch.Tensor:
        path = os.path.join(self.path, piece["file"])
        t = self._file(piece["file"]).get(name)
        if t is None:
            raise ConfigError(f"{path}: has no {name}, which the index says it holds.")
        if str(t.dtype) != entry["dtype"] or list(t.shape) != piece["sizes"]:
            raise ConfigError(f"{path}: {name} is {t.dtype} {list(t.shape)}, the index says {entry['dtype']} "
                              f"{piece['sizes']}; the file was replaced or is corrupt.")
        key = (name, piece["file"], tuple(piece["offsets"]))
        if key not in self.verified:
            if crc32(t) != piece["crc32"]:
                raise ConfigError(f"{path}: {name} fails its checksum; the file is corrupt.")
            self.verified.add(key)
        return t

    def read(self, name: str, offsets, sizes, out: torch.Tensor) -> None:
        """Fill `out` (of `sizes`) with the box of global tensor `name` that starts at `offsets`."""
        entry = self.entry(name)
        covered = 0
        for piece in entry["pieces"]:
            lo = [max(a, b) for a, b in zip(offsets, piece["offsets"])]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, piece["offsets"], piece["sizes"])]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            src = self._piece(name, entry, piece)
            src = src[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, piece["offsets"]))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))].copy_(src)
            covered += math.prod(b - a for a, b in zip(lo, hi))
        if covered != math.prod(sizes):
            raise ConfigError(f"{self.meta_path}: the pieces of {name} cover {covered} of the {math.prod(sizes)} "
                              "entries needed; the index is damaged.")

    def read_whole(self, name: str) -> torch.Tensor:
        entry = self.entry(name)
        t = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"].split(".")[-1]))
        self.read(name, [0] * len(entry["shape"]), entry["shape"], t)
        return t

"""`Checkpointer`: saves and loads checkpoints that reshard, for pretrain_gpt.py and megaengine.initialize engines.

    <root>/iter_0000100/meta.json        tag, layout, optimizer step and loss scale, the caller's own entries
                                         (model config, data position, engine counters...), and the index: each
                                         global tensor's shape, dtype and pieces (file, offsets, sizes, crc32)
    <root>/iter_0000100/shard_00003.pt   the pieces rank 3 wrote, {"<kind>/<name>": tensor}
    <root>/iter_0000100/rank_00003.pt    rank 3's own state (RNG, loader), restored at the same layout only

Kinds: `model` (the weights in their dtype), and per parameter, in the same global shape, the fp32 `master`,
`exp_avg` and `exp_avg_sq` (ZeRO's flat shards are gathered over dp for one tp shard, never the whole model);
`buffer`: module buffers that are the same on every rank holding them (FP8 amax histories and scales), whole.
Each piece is written once, by one of the ranks that hold it. Loading: every rank works out the boxes it
holds at its own layout and copies in the overlap of each saved piece; files are memory-mapped, so a rank reads
only the bytes it needs, and every file is read as data (weights_only), never as code.

Why not torch.distributed.checkpoint: a tp shard of the unpadded vocabulary is not DTensor's even split, and a
background save needs collectives on a group of its own; boxes in a JSON index are simple and do both.
"""
from __future__ import annotations

import os
import shutil
import threading
import zlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megaengine.checkpoint.pieces import FORMAT, Held, PieceReader, crc32, held_params
from megaengine.checkpoint.store import checkpoint_dir, commit, load_data_file, load_meta, save_file
from megaengine.errors import ConfigError
from megaengine.zero.optimizer import STATE_KINDS

KINDS = ("model",) + STATE_KINDS


@dataclass(frozen=True)
class Layout:
    """This rank's place in the run: what decides which pieces it holds and which it writes."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    virtual_stages: int = 1
    zero_stage: int = 0
    ep: int = 1
    tp_rank: int = 0
    replica: int = 0  # this rank's index among the dp x cp ranks holding the same weights
    ep_rank: int = 0
    expert_replica: int = 0  # ... and among the expert-data-parallel ranks holding the same experts

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("tp_rank", "replica", "ep_rank", "expert_replica")}

    def holds_as_saved(self, saved: dict) -> bool:
        """Every rank holds what the same rank held at save time (the ZeRO stage does not matter here)."""
        return all(saved.get(k, 1) == getattr(self, k) for k in ("tp", "pp", "dp", "cp", "ep", "virtual_stages"))

    def writes(self, key: str, replicated: bool, expert: bool = False) -> bool:
        """Whether this rank writes piece `key`: one of the ranks holding it (all dp x cp replicas of its tp
        shard, or also all tp ranks when replicated; for experts, their expert-data-parallel replicas and all tp
        ranks), spread by a hash of the name so no rank writes everything."""
        h, replicas = zlib.crc32(key.encode()), self.dp * self.cp
        if expert:
            holders = replicas // self.ep
            return h % (holders * self.tp) == self.expert_replica * self.tp + self.tp_rank
        if replicated:
            return h % (replicas * self.tp) == self.replica * self.tp + self.tp_rank
        return h % replicas == self.replica


@dataclass
class Loaded:
    tag: int | str
    path: str
    meta: dict
    rank_state: dict | None  # None when the layout changed (or none was saved)
    buffers: dict  # global name -> tensor (CPU), for the buffers asked for that the checkpoint holds


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    out.copy_(t)
    return out


@dataclass
class _Snapshot:
    """What one rank writes, copied to CPU so that training can go on while it is written."""
    tensors: dict
    records: list  # per tensor: name, shape (global), dtype, offsets, sizes
    rank_state: dict | None
    meta: dict


def _snapshot(tag, named_params, optimizer, layout: Layout, meta: dict, rank_state, buffers) -> _Snapshot:
    """Collective over dp (optimizer state is gathered per parameter tp shard)."""
    held = [h for h in held_params(named_params, layout.tp_rank, layout.tp, layout.ep_rank, layout.ep)
            if not h.tied_copy]
    mine = [(h, [pc for pc in h.pieces if layout.writes(pc.key, h.replicated, h.expert)]) for h in held]
    states = optimizer.param_states([h.param for h, pieces in mine if pieces])
    tensors, records = {}, []
    for h, pieces in mine:
        if not pieces:
            continue
        # The optimizer publishes its master to the parameters after every step: the weights are the master in
        # the parameters' dtype (and ZeRO-3 needs no gather of the parameters themselves).
        whole = {"model": states[h.param]["master"].to(h.param.dtype), **states[h.param]}
        for kind, t in whole.items():
            for pc in pieces:
                name = f"{kind}/{pc.key}"
                tensors[name] = _cpu_copy(pc.local(t))
                records.append({"name": name, "shape": list(pc.global_shape), "dtype": str(t.dtype),
                                "offsets": list(pc.offsets), "sizes": list(pc.sizes),
                                **({"concat_dim": pc.dim} if "#" in pc.key else {})})
    for key, t in buffers:  # replicated over tp and dp x cp: one of the ranks holding it writes it whole
        if layout.writes(key, replicated=True):
            tensors[f"buffer/{key}"] = _cpu_copy(t)
            records.append({"name": f"buffer/{key}", "shape": list(t.shape), "dtype": str(t.dtype),
                            "offsets": [0] * t.dim(), "sizes": list(t.shape)})
    dtypes = sorted({str(p.dtype) for _, p in named_params})
    scaler = optimizer.loss_scaler
    full_meta = {"format": FORMAT, "tag": tag, **meta, "layout": layout.to_dict(), "params_dtype": dtypes,
                 "optimizer": {"step": optimizer.step_count,
                               "loss_scaler": None if scaler is None else scaler.state_dict()}}
    return _Snapshot(tensors, records, rank_state, full_meta)


def _index(records_by_rank: list) -> dict:
    index = {}
    for records in records_by_rank:
        for r in records:
            entry = index.setdefault(r["name"], {"shape": r["shape"], "dtype": r["dtype"], "pieces": []})
            if "concat_dim" in r:
                entry["concat_dim"] = r["concat_dim"]
            entry["pieces"].append({k: r[k] for k in ("file", "offsets", "sizes", "crc32")})
    return dict(sorted(index.items()))


def _write(root: str, tag, snap: _Snapshot, group, retain: int | None) -> str:
    """Collective over `group` (all ranks): each writes its files under a temporary name; rank 0 writes the
    index, renames the directory and then moves the pointer."""
    rank = dist.get_rank()
    final = checkpoint_dir(root, tag)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        os.makedirs(tmp)
    dist.barrier(group)
    shard = f"shard_{rank:05d}.pt"
    files = {shard: save_file(os.path.join(tmp, shard), snap.tensors)}
    if snap.rank_state is not None:
        rank_file = f"rank_{rank:05d}.pt"
        files[rank_file] = save_file(os.path.join(tmp, rank_file), snap.rank_state)
    records = [dict(r, file=shard, crc32=crc32(snap.tensors[r["name"]])) for r in snap.records]
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((records, files), gathered, dst=0, group=group)
    if rank == 0:
        meta = dict(snap.meta, tensors=_index([r for r, _ in gathered]),
                    files={k: v for _, f in gathered for k, v in f.items()})
        commit(root, tag, tmp, meta, retain)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier(group)
    return final


def _load_params(reader: PieceReader, held: list[Held], optimizer) -> None:
    """Every parameter's fp32 state, read for this rank's boxes, into the optimizer (not yet published)."""
    for h in held:
        states = {kind: torch.zeros(h.shape, dtype=torch.float32) for kind in STATE_KINDS}  # padding: 0
        for pc in h.pieces:
            entry = reader.entry(f"model/{pc.key}")
            if tuple(entry["shape"]) != pc.global_shape:
                raise ConfigError(f"{reader.meta_path}: {pc.key} is {entry['shape']} in the checkpoint, "
                                  f"{list(pc.global_shape)} in this model: it is of another model shape.")
            if entry["dtype"] != str(h.param.dtype):
                raise ConfigError(f"{reader.meta_path}: {pc.key} was saved as {entry['dtype']}, this run holds "
                                  f"{h.param.dtype}; resume with the same --bf16/--fp16 setting.")
            # The weights are published from the master; reading them anyway checks them for damage.
            reader.read(f"model/{pc.key}", pc.offsets, pc.sizes, torch.empty(pc.sizes, dtype=h.param.dtype))
            for kind in STATE_KINDS:
                if reader.entry(f"{kind}/{pc.key}")["shape"] != entry["shape"]:
                    raise ConfigError(f"{reader.meta_path}: {kind}/{pc.key} and model/{pc.key} differ in shape.")
                reader.read(f"{kind}/{pc.key}", pc.offsets, pc.sizes, pc.local(states[kind]))
        optimizer.load_param_state(h.param, states)


def agree(error: str | None, group) -> None:
    """Raise the first rank's error on every rank, so that no rank walks on into a collective alone."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)


def _attempt(fn, *args):
    try:
        return fn(*args), None
    except ConfigError as e:
        return None, str(e)


class _Background(threading.Thread):
    def __init__(self, job):
        super().__init__(name="megaengine-checkpoint", daemon=True)
        self.job, self.error = job, None

    def run(self):
        try:
            self.job()
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self.error = e


class Checkpointer:
    """Saves and loads one run's checkpoints. Every call is collective over all ranks. With `async_save` the
    files are written in a background thread (the next save, load or `wait()` joins it); `retain` keeps only
    the newest N iteration checkpoints."""

    def __init__(self, *, async_save: bool = False, retain: int | None = None):
        self.async_save, self.retain = async_save, retain
        self._group = None
        self._group_of = None
        self._pending: _Background | None = None

    def group(self):
        """A gloo group over all ranks for the checkpoint's own collectives: a background save synchronises on it
        while training goes on over the default group. Made on first use (collective)."""
        if self._group is None or self._group_of is not dist.group.WORLD:
            self._group, self._group_of = dist.new_group(backend="gloo"), dist.group.WORLD
        return self._group

    def wait(self) -> None:
        """Wait for the background save, if any; raise what it raised. Call before the process group goes away."""
        job, self._pending = self._pending, None
        if job is not None:
            job.join()
            if job.error is not None:
                raise job.error

    def save(self, root: str, tag: int | str, *, named_params: list, optimizer, layout: Layout, meta: dict,
             rank_state: dict | None = None, buffers: list = ()) -> None:
        """Write the optimizer's state of `named_params` ((global name, parameter) pairs this rank holds), `meta`
        (JSON), this rank's `rank_state` (tensors and plain data) and `buffers` ((global name, tensor) pairs, each
        the same on every tp and dp x cp rank that holds it) as checkpoint `tag` under `root`."""
        self.wait()
        group = self.group()
        snap = _snapshot(tag, named_params, optimizer, layout, meta, rank_state, buffers)

        def job():
            _write(root, tag, snap, group, self.retain)
        if self.async_save:
            self._pending = _Background(job)
            self._pending.start()
        else:
            job()

    def load(self, root: str, tag: int | str | None = None, *, named_params: list, optimizer, layout: Layout,
             check: Callable[[dict, str], None] | None = None, buffers: list = ()) -> Loaded:
        """Restore what `save` wrote (the newest checkpoint, or `tag`) at this run's layout: the optimizer's state,
        published into the parameters, its step and loss scale. `check(meta, meta_path)` may refuse the
        checkpoint first. Any damage or mismatch is a ConfigError raised on every rank together. Of `buffers`
        (global names), those the checkpoint holds come back whole in `Loaded.buffers`; the others are left out
        (e.g. FP8 state of a run that trained without it)."""
        self.wait()
        group = self.group()
        tag, meta = load_meta(root, tag)
        path = checkpoint_dir(root, tag)
        if check is not None:
            check(meta, os.path.join(path, "meta.json"))
        held = held_params(named_params, layout.tp_rank, layout.tp, layout.ep_rank, layout.ep)
        reader, error = _attempt(PieceReader, path, meta)
        agree(error, group)
        _, error = _attempt(_load_params, reader, held, optimizer)
        agree(error, group)
        saved_buffers, error = _attempt(lambda: {n: reader.read_whole(f"buffer/{n}") for n in buffers
                                                 if f"buffer/{n}" in reader.index})
        agree(error, group)
        optimizer.publish_params()
        optimizer.step_count = int(meta["optimizer"]["step"])
        if optimizer.loss_scaler is not None and meta["optimizer"].get("loss_scaler") is not None:
            optimizer.loss_scaler.load_state_dict(meta["optimizer"]["loss_scaler"])
        rank_state = None
        if layout.holds_as_saved(meta.get("layout", {})) and f"rank_{dist.get_rank():05d}.pt" in meta.get("files", {}):
            rank_state, error = _attempt(load_data_file, os.path.join(path, f"rank_{dist.get_rank():05d}.pt"))
            agree(error, group)
        return Loaded(tag, path, meta, rank_state, saved_buffers)

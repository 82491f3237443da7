"""Checkpoints that reshard: saved at one layout, loaded at any tp, pp, virtual-stage, dp and ZeRO stage.

    <root>/latest_checkpointed_iteration.txt   the newest complete iteration (Megatron's name), written last
    <root>/iter_0000100/meta.json              iteration, consumed samples, layout, model config, optimizer step
                                               and loss scale, and the index: each global tensor's shape, dtype
                                               and pieces (file, offsets, sizes, crc32)
    <root>/iter_0000100/shard_00003.pt         the pieces rank 3 wrote, {"<kind>/<name>": tensor}
    <root>/iter_0000100/rank_00003.pt          rank 3's RNG and loader state (restored at the same layout only)

Tensors are named as in the whole model (GPT.global_name). A fused parameter ([q; k; v], SwiGLU's [gate; up])
has each part split over tp separately, so it is saved as its parts `<name>#0`, `<name>#1`, ...: then every
piece a rank holds is one box of a global tensor. The vocabulary is saved unpadded, since its padding grows
with tp. Kinds: `model` (the weights in their dtype), and per parameter, in the same global shape, the fp32
`master`, `exp_avg` and `exp_avg_sq` (ZeRO's flat shards are gathered over dp for one tp shard, never the whole
model). Each piece is written once, by one of the ranks that hold it; the last pipeline stage's copy of tied
embeddings is not written, and is read back from the word embedding.

Loading: every rank works out the boxes it holds at its own layout and copies in the overlap of each saved piece;
files are memory-mapped, so a rank reads only the bytes it needs.

Why not torch.distributed.checkpoint: a tp shard of the unpadded vocabulary is not DTensor's even split, and a
background save needs collectives on a group of its own; boxes in a JSON index are simple and do both.

Atomic: files go to `iter_N.tmp`, are fsynced, the directory is renamed, and only then does the pointer move,
so a save killed midway leaves the previous checkpoint as the one loaded.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megaengine.parallel import ConfigError

POINTER = "latest_checkpointed_iteration.txt"
META = "meta.json"
FORMAT = 2  # 1 (no "format" key): one pickled state per rank, loadable at the same layout only
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")
KINDS = ("model",) + STATE_KINDS
VOCAB_PARAMS = ("word_embeddings.weight", "output_layer.weight")
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "ffn_hidden_size", "vocab_size", "seq_length", "normalization", "position_embedding_type", "swiglu",
              "add_bias_linear", "untie_embeddings_and_output_weights")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# ---- files ----

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_file(path: str, obj) -> int:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def latest_iteration(root: str) -> int | None:
    pointer = os.path.join(root, POINTER)
    if not os.path.exists(pointer):
        return None
    text = open(pointer).read().strip()
    if not text.isdigit():
        raise ConfigError(f"{pointer}: expected an iteration number, found {text[:40]!r}.")
    return int(text)


def load_meta(root: str, iteration: int | None = None) -> tuple[int, dict]:
    """(iteration, meta) of the newest complete checkpoint under `root`, or of `iteration`."""
    if iteration is None:
        iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"{root}: no {POINTER}; no complete checkpoint there.")
    path = os.path.join(iteration_dir(root, iteration), META)
    try:
        with open(path) as f:
            return iteration, json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; the checkpoint directory is incomplete.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno}).") from None


def check_model_config(meta: dict, config: dict, path: str) -> None:
    saved = meta.get("model", {})
    diff = [f"{k}: saved {saved.get(k)}, now {config.get(k)}" for k in MODEL_KEYS if saved.get(k) != config.get(k)]
    if diff:
        raise ConfigError(f"{path}: checkpoint is of another model shape ({'; '.join(diff)}).")


# ---- where a rank's tensors sit in the global ones ----

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


def param_pieces(name: str, local_shape, *, partition_dim: int | None = None, segments=None, tp_rank: int = 0,
                 tp_size: int = 1, vocab_size: int | None = None) -> list[Piece]:
    """The boxes of global tensors that a rank's (tp-local) parameter holds. `partition_dim` None: replicated.
    `segments`: the fused parts' full sizes, each split over tp. `vocab_size`: rows past it are padding."""
    shape = tuple(local_shape)
    if partition_dim is None:
        return [_box(name, shape, 0, shape[0], 0, 0, shape[0])]
    d = partition_dim
    if segments:
        pieces, start = [], 0
        for i, seg in enumerate(segments):
            n = seg // tp_size
            pieces.append(_box(f"{name}#{i}", shape, d, seg, tp_rank * n, start, n))
            start += n
        return pieces
    n = shape[d]
    if vocab_size is None:
        return [_box(name, shape, d, n * tp_size, tp_rank * n, 0, n)]
    length = max(0, min(n, vocab_size - tp_rank * n))
    return [_box(name, shape, d, vocab_size, tp_rank * n, 0, length)] if length else []


@dataclass
class Held:
    """A parameter this rank holds, under its name in the whole model."""
    name: str
    param: torch.Tensor
    pieces: list
    replicated: bool  # the same on every tp rank
    tied_copy: bool  # the last stage's copy of tied embeddings


def held_params(chunks, tp_rank: int, tp_size: int, vocab_size: int) -> list[Held]:
    out, seen = [], set()
    for chunk in chunks:
        for local_name, p in chunk.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = chunk.global_name(local_name)
            sharded = bool(getattr(p, "tensor_parallel", False))
            pieces = param_pieces(name, getattr(p, "zero_shape", p.shape),
                                  partition_dim=p.partition_dim if sharded else None,
                                  segments=getattr(p, "partition_segments", None) if sharded else None,
                                  tp_rank=tp_rank, tp_size=tp_size,
                                  vocab_size=vocab_size if name in VOCAB_PARAMS else None)
            out.append(Held(name, p, pieces, not sharded, bool(getattr(p, "shared_embedding_copy", False))))
    return out


def writes(key: str, replicated: bool, state) -> bool:
    """Whether this rank writes piece `key`: one of the ranks holding it (all dp ranks of its tp shard, or all dp
    and tp ranks when replicated), spread by a hash of the name so no rank writes everything."""
    h = zlib.crc32(key.encode())
    if replicated:
        return h % (state.dp_size * state.tp_size) == state.dp_rank * state.tp_size + state.tp_rank
    return h % state.dp_size == state.dp_rank


# ---- the trainer's state beside the tensors ----

def rng_state() -> dict:
    import random as pyrandom
    from megaengine.tensor_parallel import random as tp_random
    return {"python": pyrandom.getstate(), "numpy": np.random.get_state(), "torch": tp_random.get_states()}


def set_rng_state(s: dict) -> None:
    import random as pyrandom
    from megaengine.tensor_parallel import random as tp_random
    pyrandom.setstate(s["python"])
    np.random.set_state(s["numpy"])
    tp_random.set_states(s["torch"])


def reseed(seed: int, state) -> None:
    """At another layout saved streams do not map onto ranks: start fresh ones the way initialize() does."""
    from megaengine.parallel.mesh import seed_everything
    from megaengine.tensor_parallel.random import model_parallel_seed
    seed_everything(seed)
    model_parallel_seed(seed, state.tp_rank, state.pp_rank)


def layout(state, chunks, optimizer) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size, "virtual_stages": len(chunks),
            "zero_stage": optimizer.stage}


def same_rank_layout(saved: dict, now: dict) -> bool:
    """Whether every rank holds what the same rank held at save time (the ZeRO stage does not matter here)."""
    return all(saved.get(k) == now[k] for k in ("tp", "pp", "dp", "virtual_stages"))


# ---- save ----

@dataclass
class Snapshot:
    """What one rank writes, copied to CPU so that training can go on while it is written."""
    tensors: dict
    records: list  # per tensor: name, shape (global), dtype, offsets, sizes
    rank_state: dict
    meta: dict


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    out.copy_(t)
    return out


def snapshot(iteration, *, chunks, optimizer, loader, config, state, args) -> Snapshot:
    """Collective over dp (optimizer state is gathered per parameter tp shard)."""
    held = [h for h in held_params(chunks, state.tp_rank, state.tp_size, config.vocab_size) if not h.tied_copy]
    mine = [(h, [pc for pc in h.pieces if writes(pc.key, h.replicated, state)]) for h in held]
    states = optimizer.param_states([h.param for h, pieces in mine if pieces])
    tensors, records = {}, []
    for h, pieces in mine:
        if not pieces:
            continue
        # The optimizer publishes its master to the parameters after every step: the weights are the master in
        # the parameters' dtype (and stage 3 needs no gather of the parameters themselves).
        whole = {"model": states[h.param]["master"].to(h.param.dtype), **states[h.param]}
        for kind, t in whole.items():
            for pc in pieces:
                name = f"{kind}/{pc.key}"
                tensors[name] = _cpu_copy(pc.local(t))
                records.append({"name": name, "shape": list(pc.global_shape), "dtype": str(t.dtype),
                                "offsets": list(pc.offsets), "sizes": list(pc.sizes),
                                **({"concat_dim": pc.dim} if "#" in pc.key else {})})
    dtypes = sorted({str(p.dtype) for c in chunks for p in c.parameters()})
    scaler = optimizer.loss_scaler
    meta = {"format": FORMAT, "iteration": iteration, "consumed_samples": loader.consumed_samples,
            "layout": layout(state, chunks, optimizer), "model": config.to_dict(), "params_dtype": dtypes,
            "optimizer": {"step": optimizer.step_count, "loss_scaler": None if scaler is None else scaler.state_dict()},
            "args": json.loads(json.dumps(vars(args), default=str))}
    rank_state = {"rng": rng_state(), "loader": loader.state_dict(), "iteration": iteration}
    return Snapshot(tensors, records, rank_state, meta)


def build_index(records_by_rank: list) -> dict:
    index = {}
    for records in records_by_rank:
        for r in records:
            entry = index.setdefault(r["name"], {"shape": r["shape"], "dtype": r["dtype"], "pieces": []})
            if "concat_dim" in r:
                entry["concat_dim"] = r["concat_dim"]
            entry["pieces"].append({k: r[k] for k in ("file", "offsets", "sizes", "crc32")})
    return dict(sorted(index.items()))


def write_checkpoint(root: str, iteration: int, snap: Snapshot, group, retain: int | None = None) -> str:
    """Collective over `group` (all ranks): write the snapshot under a temporary name; rank 0 writes the index,
    renames the directory and then moves the pointer."""
    rank = dist.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        os.makedirs(tmp)
    dist.barrier(group)
    shard = f"shard_{rank:05d}.pt"
    files = {shard: _save_file(os.path.join(tmp, shard), snap.tensors)}
    rank_file = f"rank_{rank:05d}.pt"
    files[rank_file] = _save_file(os.path.join(tmp, rank_file), snap.rank_state)
    records = [dict(r, file=shard, crc32=crc32(snap.tensors[r["name"]])) for r in snap.records]
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((records, files), gathered, dst=0, group=group)
    if rank == 0:
        meta = dict(snap.meta, tensors=build_index([r for r, _ in gathered]),
                    files={k: v for _, f in gathered for k, v in f.items()})
        _atomic_write_bytes(os.path.join(tmp, META), json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _atomic_write_bytes(os.path.join(root, POINTER), f"{iteration}\n".encode())
        prune(root, iteration, retain)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier(group)
    return final


def prune(root: str, current: int, retain: int | None) -> None:
    """Drop leftovers of killed saves, and with `retain` all but the newest `retain` checkpoints up to `current`
    (directories of later iterations are another run's, and are left alone)."""
    older = []
    for d in os.listdir(root):
        m = re.fullmatch(r"iter_(\d{7})(\.tmp)?", d)
        if not m or int(m.group(1)) >= current:
            continue
        if m.group(2):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        else:
            older.append(d)
    if retain:
        for d in sorted(older)[:len(older) - (retain - 1)]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


_coordination: list = []  # [(default group, its gloo twin)]


def coordination_group():
    """A gloo group over all ranks for the checkpoint's own collectives: a background save synchronises on it
    while training goes on over the default group. Collective the first time (every rank saves or loads)."""
    world = dist.group.WORLD
    if not _coordination or _coordination[0][0] is not world:
        _coordination[:] = [(world, dist.new_group(backend="gloo"))]
    return _coordination[0][1]


class _Background(threading.Thread):
    def __init__(self, job):
        super().__init__(name="megaengine-checkpoint", daemon=True)
        self.job, self.error = job, None

    def run(self):
        try:
            self.job()
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by finalize_async_saves
            self.error = e


_pending: list = []  # the background save still being written (at most one)


def finalize_async_saves() -> None:
    """Wait for the background save, if any; raise what it raised. Call before the process group goes away."""
    while _pending:
        job = _pending.pop(0)
        job.join()
        if job.error is not None:
            raise job.error


def save_training_state(root, iteration, *, chunks, optimizer, loader, config, state, args) -> None:
    """Collective: every rank saves its share of the model, optimizer, data position and RNG. With
    `args.async_save` the files are written in the background (the next save or finalize_async_saves() waits);
    `args.save_retain` keeps only the newest N checkpoints."""
    finalize_async_saves()
    group = coordination_group()
    snap = snapshot(iteration, chunks=chunks, optimizer=optimizer, loader=loader, config=config, state=state,
                    args=args)
    retain = getattr(args, "save_retain", None)

    def job():
        write_checkpoint(root, iteration, snap, group, retain)
    if getattr(args, "async_save", False):
        _pending.append(_Background(job))
        _pending[-1].start()
    else:
        job()


# ---- load ----

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
            if not os.path.exists(path):
                raise ConfigError(f"{path}: missing; the checkpoint directory is incomplete.")
            size, expected = os.path.getsize(path), self.files.get(file)
            if expected is not None and size != expected:
                raise ConfigError(f"{path}: {size} bytes, but {expected} were written; the file is truncated or "
                                  "was replaced.")
            try:
                self.opened[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure to read means the file is damaged
                raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); the file is "
                                  "corrupt or truncated.") from None
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


def load_params(reader: PieceReader, chunks, optimizer, config, state) -> None:
    """Every parameter's fp32 state, read for this rank's boxes, into the optimizer (not yet published)."""
    for h in held_params(chunks, state.tp_rank, state.tp_size, config.vocab_size):
        shape = getattr(h.param, "zero_shape", h.param.shape)
        states = {kind: torch.zeros(shape, dtype=torch.float32) for kind in STATE_KINDS}  # vocab padding stays 0
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


def load_training_state(root, *, chunks, optimizer, loader, config, state, args) -> int:
    """Restore what save_training_state wrote, at this run's layout; returns the iteration to continue from.
    Any damage or mismatch is a ConfigError raised on every rank together, before any training step."""
    finalize_async_saves()
    group = coordination_group()
    iteration, meta = load_meta(root)
    path = iteration_dir(root, iteration)
    check_model_config(meta, config.to_dict(), os.path.join(path, META))
    _, error = _attempt(load_params, PieceReader(path, meta), chunks, optimizer, config, state)
    agree(error, group)
    optimizer.publish_params()
    optimizer.step_count = int(meta["optimizer"]["step"])
    if optimizer.loss_scaler is not None and meta["optimizer"].get("loss_scaler") is not None:
        optimizer.loss_scaler.load_state_dict(meta["optimizer"]["loss_scaler"])
    loader.load_state_dict({"consumed_samples": meta["consumed_samples"]})
    now = layout(state, chunks, optimizer)
    if same_rank_layout(meta.get("layout", {}), now):
        rank_state, error = _attempt(load_rank_state, path)
        agree(error, group)
        set_rng_state(rank_state["rng"])
    else:
        reseed(getattr(args, "seed", 1234) + iteration, state)
    if dist.get_rank() == 0:
        saved = meta.get("layout", {})
        print(f"resumed from {path} at iteration {iteration} (saved at tp {saved.get('tp')} pp {saved.get('pp')} "
              f"dp {saved.get('dp')} ZeRO {saved.get('zero_stage')}; now tp {now['tp']} pp {now['pp']} "
              f"dp {now['dp']} ZeRO {now['zero_stage']})", flush=True)
    return iteration


def load_rank_state(path: str) -> dict:
    file = os.path.join(path, f"rank_{dist.get_rank():05d}.pt")
    if not os.path.exists(file):
        raise ConfigError(f"{file}: missing; the checkpoint directory is incomplete.")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        raise ConfigError(f"{file}: cannot be read ({type(e).__name__}); the file is corrupt or truncated.") from None


# ---- the whole model in one process ----

def consolidated_state_dict(root: str, kind: str = "model", iteration: int | None = None) -> tuple[dict, dict]:
    """(model config dict, {name: full tensor}) of one kind, at tp=1 naming: fused parts joined again, the
    vocabulary unpadded. For export and inspection: it holds the whole model, so use it in one process."""
    iteration, meta = load_meta(root, iteration)
    reader = PieceReader(iteration_dir(root, iteration), meta)
    parts: dict = {}
    out = {}
    for name, entry in meta.get("tensors", {}).items():
        if not name.startswith(kind + "/"):
            continue
        t = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"].split(".")[-1]))
        reader.read(name, [0] * len(entry["shape"]), entry["shape"], t)
        key = name[len(kind) + 1:]
        if "#" in key:
            base, i = key.split("#")
            parts.setdefault(base, {})[int(i)] = (t, entry["concat_dim"])
        else:
            out[key] = t
    for base, pieces in parts.items():
        out[base] = torch.cat([pieces[i][0] for i in sorted(pieces)], dim=pieces[0][1])
    return meta["model"], dict(sorted(out.items()))


def load_model(root: str, device="cpu"):
    """The whole GPT (tp=1, one stage) with the weights of the checkpoint under `root`, whatever its layout."""
    from megaengine.models import GPT, GPTConfig
    from megaengine.parallel.mesh import init_distributed
    config_dict, tensors = consolidated_state_dict(root)
    init_distributed()
    group = (dist.group.WORLD if dist.get_world_size() == 1
             else dist.new_group([dist.get_rank()], use_local_synchronization=True))
    config = GPTConfig.from_dict(config_dict)
    model = GPT(config, group)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = tensors[model.global_name(name)]
            p.data = torch.zeros(p.shape, dtype=full.dtype)
            p.data[:full.shape[0]].copy_(full)  # vocabulary rows past vocab_size are padding
    return model.to(device)

"""Checkpoints that never lose data: written under a temporary name, renamed, and the pointer written last.

Layout (Megatron's pointer file name, so tooling that reads it keeps working):
    <dir>/latest_checkpointed_iteration.txt         the newest complete iteration, written last
    <dir>/iter_0000100/meta.json                     layout, iteration, consumed samples, model config
    <dir>/iter_0000100/rank_00003.pt                 this rank's model shard, optimizer shard, RNG states
Each rank saves only what it holds (its tp/pp shard, its ZeRO shard): no rank gathers the whole model.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from megaengine.parallel import ConfigError

POINTER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str, iteration: int, rank_state: dict, meta: dict, *, group=None, retain: int | None = None) -> str:
    """Collective over `group` (default: the world). Every rank passes its own `rank_state`; rank 0 of the
    group writes `meta` and, once every rank's file is on disk, renames and points `latest` at it."""
    rank = dist.get_rank(group)
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        os.makedirs(tmp)
    dist.barrier(group)
    path = os.path.join(tmp, f"rank_{dist.get_rank():05d}.pt")
    torch.save(rank_state, path + ".tmp")
    with open(path + ".tmp", "rb+") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    dist.barrier(group)
    if rank == 0:
        _atomic_write_bytes(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _atomic_write_bytes(os.path.join(root, POINTER), f"{iteration}\n".encode())
        if retain:
            _prune(root, retain)
    dist.barrier(group)
    return final


def _prune(root: str, retain: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith(".tmp"))
    for d in done[:-retain]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def latest_iteration(root: str) -> int | None:
    pointer = os.path.join(root, POINTER)
    if not os.path.exists(pointer):
        return None
    text = open(pointer).read().strip()
    if not text.isdigit():
        raise ConfigError(f"{pointer}: expected an iteration number, found {text[:40]!r}.")
    return int(text)


def load_meta(root: str) -> tuple[int, dict]:
    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"--load {root}: no {POINTER}; no complete checkpoint there.")
    path = os.path.join(iteration_dir(root, iteration), "meta.json")
    try:
        with open(path) as f:
            return iteration, json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; the checkpoint directory is incomplete.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno}).") from None


def check_layout(meta: dict, layout: dict, path: str) -> None:
    saved = meta.get("layout", {})
    diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
        raise ConfigError(f"{path}: checkpoint layout differs ({detail}). Resume with the layout it was saved at.")


def check_model_config(meta: dict, config: dict, path: str) -> None:
    saved = meta.get("model", {})
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
            "vocab_size", "seq_length", "normalization", "position_embedding_type", "swiglu")
    diff = [f"{k}: saved {saved.get(k)}, now {config.get(k)}" for k in keys if saved.get(k) != config.get(k)]
    if diff:
        raise ConfigError(f"{path}: checkpoint is of another model shape ({'; '.join(diff)}).")


def load_rank_state(root: str, iteration: int) -> dict:
    path = os.path.join(iteration_dir(root, iteration), f"rank_{dist.get_rank():05d}.pt")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: missing; was the checkpoint saved with another number of ranks?")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is damaged
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is corrupt or truncated.") from None

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

import numpy as np
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


# ---- the trainer's state ----

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


def layout(state, chunks, optimizer) -> dict:
    return {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size, "virtual_stages": len(chunks),
            "zero_stage": optimizer.stage}


def save_training_state(root, iteration, *, chunks, optimizer, loader, config, state, args) -> None:
    """Collective: every rank saves what it holds of the model, optimizer, data position and RNG."""
    meta = {"iteration": iteration, "consumed_samples": loader.consumed_samples, "layout": layout(state, chunks, optimizer),
            "model": config.to_dict(), "args": {k: v for k, v in vars(args).items()}}
    rank_state = {"model": [c.state_dict() for c in chunks], "optimizer": optimizer.state_dict(),
                  "rng": rng_state(), "loader": loader.state_dict(), "iteration": iteration}
    path = save(root, iteration, rank_state, meta)
    if dist.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)


def load_training_state(root, *, chunks, optimizer, loader, config, state, args) -> int:
    """Restore what save_training_state wrote; returns the iteration to continue from."""
    iteration, meta = load_meta(root)
    path = iteration_dir(root, iteration)
    check_layout(meta, layout(state, chunks, optimizer), path)
    check_model_config(meta, config.to_dict(), path)
    rank_state = load_rank_state(root, iteration)
    for chunk, saved in zip(chunks, rank_state["model"]):
        chunk.load_state_dict(saved)
    optimizer.load_state_dict(rank_state["optimizer"])
    loader.load_state_dict(rank_state["loader"])
    set_rng_state(rank_state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at iteration {iteration}", flush=True)
    return iteration



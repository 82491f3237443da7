"""The files of a checkpoint directory: atomic writes, the pointer to the newest checkpoint, meta.json, pruning,
and loading a file as data only.

    <root>/latest_checkpointed_iteration.txt   the newest complete checkpoint's tag (Megatron's name), written last
    <root>/iter_0000100/                       a checkpoint tagged with an iteration; any other tag names its own
                                               directory (`engine.save_checkpoint(dir, tag="best")`)
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import torch

from megaengine.errors import ConfigError

POINTER = "latest_checkpointed_iteration.txt"
META = "meta.json"
OLD_ENGINE_POINTER = "latest"  # megaengine.initialize engines before format 2: one pickle per rank


def checkpoint_dir(root: str, tag: int | str) -> str:
    if isinstance(tag, int):
        return os.path.join(root, f"iter_{tag:07d}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", tag):
        raise ConfigError(f"checkpoint tag {tag!r}: use letters, digits, '_', '.' and '-' only.")
    return os.path.join(root, tag)


def iteration_dir(root: str, iteration: int) -> str:
    return checkpoint_dir(root, iteration)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_file(path: str, obj) -> int:
    """torch.save, fsynced; returns the file's size (recorded in meta.json to catch truncation)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


def load_data_file(path: str, *, mmap: bool = False):
    """A checkpoint file as plain data: tensors, numbers, strings, lists, dicts. Anything else (a pickled object
    or function) is refused before it is built, so nothing in the file runs."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: missing; the checkpoint directory is incomplete.")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: holds something other than tensors and plain data, so it was not loaded (a "
                          f"checkpoint is read as data only; nothing in it ran). Loader said: {str(e)[:200]}") from None
    except Exception as e:  # noqa: BLE001 - any other failure to read means the file is damaged
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); the file is corrupt or "
                          "truncated.") from None


def latest_tag(root: str) -> int | str | None:
    """The tag the pointer names (an int for iteration checkpoints), or None when there is no checkpoint."""
    pointer = os.path.join(root, POINTER)
    if not os.path.exists(pointer):
        if os.path.exists(os.path.join(root, OLD_ENGINE_POINTER)):
            raise ConfigError(f"{root}: an engine checkpoint in the old per-rank format (a '{OLD_ENGINE_POINTER}' "
                              "file and rank*.pt pickles), which can only be loaded at the layout that wrote it and "
                              "is no longer read. Load it with megaengine 0.1's engine and save it again with this "
                              "version, or start from scratch.")
        return None
    text = open(pointer).read().strip()
    if text.isdigit():
        return int(text)
    checkpoint_dir(root, text)  # refuses a pointer that is not a plain tag
    return text


def latest_iteration(root: str) -> int | None:
    tag = latest_tag(root)
    return tag if isinstance(tag, int) or tag is None else None


def load_meta(root: str, tag: int | str | None = None) -> tuple[int | str, dict]:
    """(tag, meta) of the newest complete checkpoint under `root`, or of `tag`."""
    if tag is None:
        tag = latest_tag(root)
    if tag is None:
        raise ConfigError(f"{root}: no {POINTER}; no complete checkpoint there.")
    path = os.path.join(checkpoint_dir(root, tag), META)
    try:
        with open(path) as f:
            return tag, json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; the checkpoint directory is incomplete.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno}).") from None


def commit(root: str, tag: int | str, tmp: str, meta: dict, retain: int | None) -> str:
    """Make a fully written temporary directory the checkpoint `tag`: index last inside it, rename, then move the
    pointer. A save killed at any point leaves the previous checkpoint as the one loaded."""
    final = checkpoint_dir(root, tag)
    atomic_write_bytes(os.path.join(tmp, META), json.dumps(meta, indent=1).encode())
    fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_bytes(os.path.join(root, POINTER), f"{tag}\n".encode())
    if isinstance(tag, int):
        prune(root, tag, retain)
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

"""Build-once directories shared by ranks: one rank builds, the others wait on a barrier, then all read.

A build goes into a temporary sibling directory that is renamed into place only when complete, so a killed
build is never mistaken for a finished one. Only the final name is ever read.
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable

import torch.distributed as dist


def is_builder(group=None) -> bool:
    """True on the rank that builds for `group`: its global rank 0 (the world's rank 0 when group is None)."""
    if not dist.is_initialized():
        return True
    first = 0 if group is None else dist.get_global_rank(group, 0)
    return dist.get_rank() == first


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _build_into(final_dir: str, build: Callable[[str], None]) -> None:
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final_dir}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        build(tmp)
        os.rename(tmp, final_dir)
    except OSError:
        # Another process finished the same build first: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final_dir):
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(final_dir: str, build: Callable[[str], None], group=None) -> str:
    """Make `final_dir` exist, calling build(tmp_dir) on one rank of `group` if it does not yet.

    Every rank of `group` must call this (it holds a barrier). A builder that fails still reaches the barrier,
    so the others do not hang; they then find no directory and build it themselves, which also covers nodes
    that do not share the builder's filesystem.
    """
    error = None
    if is_builder(group) and not os.path.isdir(final_dir):
        try:
            _build_into(final_dir, build)
        except BaseException as e:  # noqa: BLE001 - re-raised after the barrier
            error = e
    barrier(group)
    if error is not None:
        raise error
    if not os.path.isdir(final_dir):
        _build_into(final_dir, build)
    return final_dir

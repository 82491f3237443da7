"""Run a function on N CPU processes joined by a gloo process group: the harness of the distributed tests.

`run_distributed(fn, world_size, *args)` forks the workers (no re-import of torch: fast on 2 cores), gives
each a default process group, calls `fn(rank, world_size, *args)` and returns the list of what each rank
returned. A worker that raises fails the call with its traceback; a hang is killed after `timeout` seconds.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error parity tests bound (fp32: <= 1e-5)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def single_rank_groups():
    """Each rank's own group of one, for building the tp=1 reference model inside a distributed test.
    Every rank must call this (group creation is collective)."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return groups[dist.get_rank()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args, seconds):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    path = os.path.join(out_dir, f"{rank}.pkl")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=seconds))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        from megaengine.parallel import mesh
        mesh._STATE = None
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(path, "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0):
    """Call fn(rank, world_size, *args) on `world_size` forked gloo ranks; return their results by rank."""
    port = free_port()
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args, timeout), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(value)
            results.append(value)
        if hung:
            errors.insert(0, f"ranks {hung} still running after {timeout:.0f}s")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results

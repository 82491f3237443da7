"""Parallel state: one DeviceMesh of shape (dp, pp, tp), tp innermost, and the process groups cut from it.

This is the only place that creates process groups for the model's layout. Everything else receives the
groups it needs (a layer takes its tp group); `get_state()` exists as a convenience default only.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megaengine.errors import ConfigError


@dataclass
class ParallelState:
    mesh: DeviceMesh
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    seed: int
    # First and last pipeline stage of this rank's pipeline: they hold the two copies of tied word
    # embeddings and sum their gradients over it. None when pp == 1 (one copy).
    embedding_group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def pp_global_rank(self, stage: int) -> int:
        """Global rank of `stage` in this rank's pipeline."""
        return dist.get_global_rank(self.pp_group, stage)


_STATE: ParallelState | None = None


def check_layout(world_size: int, tp: int, pp: int, dp: int | None) -> int:
    """Validate a (dp, pp, tp) layout for `world_size` ranks and return dp."""
    for name, flag, v in (("tp", "--tensor-model-parallel-size", tp), ("pp", "--pipeline-model-parallel-size", pp)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} (--{name}) must be an integer >= 1, got {v!r}.")
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp x pp = {tp} x {pp} = {tp * pp}. "
            f"Launch a multiple of {tp * pp} processes (torchrun --nproc_per_node), or change --tp/--pp.")
    expected = world_size // (tp * pp)
    if dp is not None and dp != expected:
        raise ConfigError(f"dp={dp} does not fit: world size {world_size} / (tp {tp} x pp {pp}) = {expected}.")
    return expected


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def reseed(seed: int, state: "ParallelState") -> None:
    """Fresh streams the way initialize() makes them (a resume at another layout, where saved ones do not map)."""
    from megaengine.tensor_parallel.random import model_parallel_seed
    seed_everything(seed)
    model_parallel_seed(seed, state.tp_rank, state.pp_rank)


def rng_state() -> dict:
    """Python's, numpy's and torch's random streams (both of tensor_parallel.random's) as tensors and plain
    data, so that a checkpoint holding them loads with weights_only=True."""
    from megaengine.tensor_parallel import random as tp_random
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": tp_random.get_states(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}


def set_rng_state(s: dict) -> None:
    from megaengine.tensor_parallel import random as tp_random
    n = s["numpy"]
    random.setstate(s["python"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    tp_random.set_states(s["torch"])


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """Start the default process group from torchrun's environment, or as a single process without it."""
    if dist.is_initialized():
        return
    backend = backend or _default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(timeout),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a plain `python script.py`: a world of one, no rendezvous needed
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys prefixed by the restart attempt. After `--max-restarts` restarts a worker
    group, the store still holds the previous attempt's gloo addresses under the same keys, and the new
    workers connect to dead ports (seen with torch 2.13 + gloo); a fresh prefix per attempt avoids that."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent_hosts and int(os.environ["RANK"]) == 0, timeout=timeout)
    return dist.PrefixStore(f"megaengine/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def initialize(tp: int = 1, pp: int = 1, dp: int | None = None, *, backend: str | None = None,
               seed: int = 1234, timeout_minutes: float = 10.0) -> ParallelState:
    """Build the (dp, pp, tp) mesh over all ranks and make it the default state."""
    global _STATE
    init_distributed(backend, timeout_minutes)
    world = dist.get_world_size()
    dp = check_layout(world, tp, pp, dp)
    backend_name = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend_name == "nccl"
              else torch.device("cpu"))
    mesh = init_device_mesh(device.type, (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    tp_group, pp_group, dp_group = (mesh.get_group(n) for n in ("tp", "pp", "dp"))
    embedding_group = _embedding_group(mesh.mesh, pp) if pp > 1 else None
    # Groups are set up through the rendezvous store, which rank 0 hosts outside torchrun. Without this barrier
    # a rank that is done first can fail fast on a bad input and exit, taking the store with it while a peer
    # still builds its groups: the peer then dies of "Broken pipe" instead of reaching the same clear error.
    dist.barrier()
    _STATE = ParallelState(
        mesh=mesh, tp_group=tp_group, pp_group=pp_group, dp_group=dp_group,
        tp_rank=mesh.get_local_rank("tp"), tp_size=tp,
        pp_rank=mesh.get_local_rank("pp"), pp_size=pp,
        dp_rank=mesh.get_local_rank("dp"), dp_size=dp,
        device=device, seed=seed, embedding_group=embedding_group)
    # The same seed everywhere: weights are created whole and sliced, so every rank must draw the same numbers.
    # The tp-region dropout stream is forked per tp rank by tensor_parallel.random.
    reseed(seed, _STATE)
    return _STATE


def _embedding_group(ranks: torch.Tensor, pp: int):
    """Every rank takes part in creating every group (a collective), then keeps the one it belongs to."""
    me, mine = dist.get_rank(), None
    for d in range(ranks.shape[0]):
        for t in range(ranks.shape[2]):
            members = [int(ranks[d, 0, t]), int(ranks[d, pp - 1, t])]
            group = dist.new_group(members)
            if me in members:
                mine = group
    return mine


def get_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("megaengine.parallel.initialize() has not been called; pass a group explicitly "
                           "or call initialize(tp=..., pp=...) first.")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()

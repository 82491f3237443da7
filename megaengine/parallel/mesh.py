"""Parallel state: one DeviceMesh of shape (dp, pp, cp, tp), tp innermost, cp next, and the process groups
cut from it, expert groups included.

This is the only place that creates process groups for the model's layout. Everything else receives the
groups it needs (a layer takes its tp group); `get_state()` exists as a convenience default only.

Global rank = ((d * pp + p) * cp + c) * tp + t. Weights are replicated over dp and cp, so gradients are reduced
and ZeRO shards over the dp x cp ranks (`dp_cp_group`). Expert parallelism is carved out of dp, as Megatron
does: the dp index splits as d = e_dp * ep + e; an expert-parallel group is `ep` consecutive dp ranks at the
same (pp, cp, tp) position, and expert parameters are reduced over the ranks holding the same experts
(`expert_dp_group`: the other e_dp, and every cp rank).
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
    # Context parallelism: the ranks sharing one sequence; and all replicas of the weights (dp x cp).
    cp_group: dist.ProcessGroup | None = None
    cp_rank: int = 0
    cp_size: int = 1
    dp_cp_group: dist.ProcessGroup | None = None
    dp_cp_rank: int = 0
    dp_cp_size: int = 1
    # Expert parallelism, carved out of dp: the ranks splitting the experts, and those holding the same ones.
    ep_group: dist.ProcessGroup | None = None
    ep_rank: int = 0
    ep_size: int = 1
    expert_dp_group: dist.ProcessGroup | None = None
    expert_dp_rank: int = 0
    expert_dp_size: int = 1

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


def check_layout(world_size: int, tp: int, pp: int, dp: int | None, cp: int = 1, ep: int = 1) -> int:
    """Validate a (dp, pp, cp, tp) layout, with ep carved out of dp, for `world_size` ranks; return dp."""
    for name, flag, v in (("tp", "--tensor-model-parallel-size", tp), ("pp", "--pipeline-model-parallel-size", pp),
                          ("cp", "--context-parallel-size", cp), ("ep", "--expert-model-parallel-size", ep)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag} (--{name}) must be an integer >= 1, got {v!r}.")
    model = tp * pp * cp
    if world_size % model != 0:
        sizes = f"tp x pp{' x cp' if cp > 1 else ''} = {tp} x {pp}{f' x {cp}' if cp > 1 else ''} = {model}"
        raise ConfigError(
            f"world size {world_size} is not divisible by {sizes}. Launch a multiple of {model} processes "
            f"(torchrun --nproc_per_node), or change --tp/--pp{'/--cp' if cp > 1 else ''}.")
    expected = world_size // model
    if dp is not None and dp != expected:
        raise ConfigError(f"dp={dp} does not fit: world size {world_size} / (tp {tp} x pp {pp} x cp {cp}) = {expected}.")
    if expected % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} must divide the data-parallel size {expected} (experts "
                          "are split over data-parallel ranks); choose a divisor of it.")
    return expected


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def reseed(seed: int, state: "ParallelState") -> None:
    """Fresh streams the way initialize() makes them (a resume at another layout, where saved ones do not map)."""
    from megaengine.tensor_parallel.random import model_parallel_seed
    seed_everything(seed)
    model_parallel_seed(seed, state.tp_rank, state.pp_rank, state.cp_rank)


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


def initialize(tp: int = 1, pp: int = 1, dp: int | None = None, *, cp: int = 1, ep: int = 1,
               backend: str | None = None, seed: int = 1234, timeout_minutes: float = 10.0) -> ParallelState:
    """Build the (dp, pp, cp, tp) mesh over all ranks, with expert groups carved out of dp, and make it the
    default state."""
    global _STATE
    init_distributed(backend, timeout_minutes)
    world = dist.get_world_size()
    dp = check_layout(world, tp, pp, dp, cp, ep)
    backend_name = dist.get_backend()
    device = (torch.device("cuda", torch.cuda.current_device()) if backend_name == "nccl"
              else torch.device("cpu"))
    mesh = init_device_mesh(device.type, (dp, pp, cp, tp), mesh_dim_names=("dp", "pp", "cp", "tp"))
    tp_group, pp_group, cp_group, dp_group = (mesh.get_group(n) for n in ("tp", "pp", "cp", "dp"))
    ranks = mesh.mesh  # (dp, pp, cp, tp) -> global rank
    embedding_group = _my_group(ranks[:, [0, pp - 1]].permute(0, 2, 3, 1).reshape(-1, 2)) if pp > 1 else None
    # Replicas of the weights: same (pp, tp), any (dp, cp); ordered d * cp + c.
    dp_cp_group = dp_group if cp == 1 else _my_group(ranks.permute(1, 3, 0, 2).reshape(-1, dp * cp))
    ep_group, expert_dp_group = None, dp_cp_group
    if ep > 1:
        split = ranks.reshape(dp // ep, ep, pp, cp, tp)
        ep_group = _my_group(split.permute(0, 2, 3, 4, 1).reshape(-1, ep))
        expert_dp_group = _my_group(split.permute(1, 2, 4, 0, 3).reshape(-1, dp // ep * cp))
    # Groups are set up through the rendezvous store, which rank 0 hosts outside torchrun. Without this barrier
    # a rank that is done first can fail fast on a bad input and exit, taking the store with it while a peer
    # still builds its groups: the peer then dies of "Broken pipe" instead of reaching the same clear error.
    dist.barrier()
    _STATE = ParallelState(
        mesh=mesh, tp_group=tp_group, pp_group=pp_group, dp_group=dp_group,
        tp_rank=mesh.get_local_rank("tp"), tp_size=tp,
        pp_rank=mesh.get_local_rank("pp"), pp_size=pp,
        dp_rank=mesh.get_local_rank("dp"), dp_size=dp,
        device=device, seed=seed, embedding_group=embedding_group,
        cp_group=cp_group, cp_rank=mesh.get_local_rank("cp"), cp_size=cp,
        dp_cp_group=dp_cp_group, dp_cp_rank=dist.get_rank(dp_cp_group), dp_cp_size=dp * cp,
        ep_group=ep_group, ep_rank=0 if ep_group is None else dist.get_rank(ep_group), ep_size=ep,
        expert_dp_group=expert_dp_group, expert_dp_rank=dist.get_rank(expert_dp_group),
        expert_dp_size=dp // ep * cp)
    # The same seed everywhere: weights are created whole and sliced, so every rank must draw the same numbers.
    # The tp-region dropout stream is forked per tp rank by tensor_parallel.random.
    reseed(seed, _STATE)
    return _STATE


def _my_group(members: torch.Tensor):
    """Create one group per row of `members` (global ranks) and return the one this rank is in. Collective:
    every rank creates every group, in the same order."""
    me, mine = dist.get_rank(), None
    for row in members.tolist():
        group = dist.new_group(row)
        if me in row:
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

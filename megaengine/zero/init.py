"""`zero_init()`: build a model already sharded for ZeRO stage 3 (DeepSpeed's `zero.Init`), so no rank ever
holds the whole model.

    with megaengine.zero_init():           # or zero_init(dp_group, dtype=torch.bfloat16, device="cuda")
        model = MyModel()                  # each submodule is sharded as soon as it is attached to its parent
    engine = megaengine.initialize(model, "configs/zero/zero3.json")

A module is complete when its parent attaches it (`self.fc = nn.Linear(...)`: its __init__ and parameter
initialisation are done). At that moment its own parameters larger than `param_persistence_threshold` (ZeRO-3's
unit: one module's own parameters, megaengine.zero.stage3) are cast to `dtype`, packed into one flat tensor
padded to a multiple of dp, made equal on every rank (broadcast from dp rank 0, as the optimizer does with a
whole model), and only this rank's 1/dp slice is kept (the unit's `shard`). The parameters become empty
tensors whose `ParamInfo` records their full shape and unit (a zero.buffers.Bucket, as stage 3 keeps it).
So a rank holds its shards plus the one module being built: a model built layer by layer never exists whole.
Parameters the hook never sees (the root module's own) stay whole until the optimizer shards them, as it does
any model.

ZeroOptimizer at stage 3 adopts these units as they are (no copy, no gather); any other stage refuses a
sharded model. Inside `zero_init`, a module's forward before the optimizer exists fails loudly (its
parameters are empty).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from megaengine.parallel import comm
from megaengine.parallel.params import param_info, set_param_info
from megaengine.zero.buffers import Bucket


def shard_module_params(params: list, group, dtype, device, broadcast: bool = True) -> Bucket:
    """Pack `params` (one module's) into a stage-3 unit and keep only this rank's shard: the unit is left as
    the stage-3 gatherer leaves a unit between uses (flat storage freed, parameters empty)."""
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype=dtype, device=device)
    u = Bucket(-1, params, dist.get_world_size(group), dist.get_rank(group), group)
    if broadcast and dist.get_world_size(group) > 1:  # replicas start from dp rank 0's values, whatever RNG made them
        comm.broadcast(u.data, dist.get_global_rank(group, 0) if group is not None else 0, group)
    u.shard = u.data[u.lo:u.hi].clone()
    for p in params:
        set_param_info(p, full_shape=tuple(p.shape), zero_unit=u)
        p.data = torch.empty(0, dtype=u.dtype, device=u.device)
    u.data.untyped_storage().resize_(0)
    return u


def sharded_units(modules) -> list[Bucket]:
    """The units zero_init made for the parameters of `modules`, in first-seen order."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            u = param_info(p).zero_unit
            if u is not None and id(u) not in seen:
                seen.add(id(u))
                out.append(u)
    return out


def cast_sharded_(module: nn.Module, dtype) -> None:
    """module.to(dtype) for a model built under zero_init: also casts the shards the parameters live in."""
    module.to(dtype)
    for u in sharded_units([module]):
        if u.dtype != dtype:
            u.dtype, u.shard = dtype, u.shard.to(dtype)
            u.data = torch.empty(u.numel, dtype=dtype, device=u.device)
            u.data.untyped_storage().resize_(0)


def _default_group():
    from megaengine import parallel
    if parallel.is_initialized():
        return parallel.get_state().dp_group
    parallel.init_distributed()
    return None


@contextlib.contextmanager
def zero_init(dp_group=None, *, dtype=None, device=None, param_persistence_threshold: int = 100_000,
              broadcast: bool = True, enabled: bool = True):
    """Within, every module attached to a parent has its large own parameters sharded over `dp_group` (default:
    the initialised parallel state's dp group, else the world). `dtype`: the parameters' dtype (default: as
    built); `device`: where the shards live (default: where the parameters were built);
    `param_persistence_threshold`: ZeRO-3's (parameters this small stay whole); `broadcast`: make the replicas
    equal by broadcasting each module from dp rank 0, as DeepSpeed does (False when every rank draws the same
    numbers anyway, as the GPT's seeded init does). Yields the list of units made."""
    if not enabled:
        yield []
        return
    group = dp_group if dp_group is not None else _default_group()
    units: list[Bucket] = []

    def on_attach(parent, name, module):
        if module is None:
            return
        own = [p for p in module.parameters(recurse=False)
               if p.requires_grad and param_info(p).zero_unit is None and p.numel() > param_persistence_threshold]
        if own:
            units.append(shard_module_params(own, group, dtype or own[0].dtype, device or own[0].device, broadcast))

    handle = nn.modules.module.register_module_module_registration_hook(on_attach)
    try:
        yield units
    finally:
        handle.remove()

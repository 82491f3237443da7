"""ZeRO stage 3: parameters sharded over dp, gathered around each module's forward and backward.

A unit is one module's own parameters larger than `param_persistence_threshold` (smaller ones stay whole and
are treated as in stage 2). A unit is a `Bucket` whose flat tensor exists only while gathered; between uses
the rank keeps its 1/dp `shard`, the parameters are empty tensors (so a stray use fails loudly) and the flat
tensor's storage is resized to zero. Storage resizing (as FSDP does) keeps the views autograd saved in
forward valid: the backward pre-hook refills the same storage.

Gathers: forward pre-hook (then the next units in first-forward order are prefetched, up to
`prefetch_numel` elements and `max_live_numel` live), forward post-hook releases; backward pre-hook gathers
again (prefetching the previous units), and the unit is released when all its gradients have arrived (the
reducer's `on_grads_ready`). A parameter used outside its module's forward (a tied output embedding read by
the parent) must be announced with `register_external_parameter(module, param)`.

A model built under `zero_init` (zero/init.py) arrives with its units already made (each parameter's
`ParamInfo.zero_unit`): they are adopted as they are, with only their shard ever allocated.

In a pipeline (pp > 1) every micro-batch's forward and backward gather and release the units of the stage's
chunks as above, and the executor calls `prefetch_first` before each p2p wait with the units the next action
needs first. A split backward's W pass (zero bubble) computes weight gradients after a later forward may
have released the unit; accumulating them needs the parameter's shape, so a gradient arriving for a
released unit gathers it again (a tensor hook on each parameter).

Activation recomputation runs module forwards inside a backward pass. Such a forward gathers as usual but
neither prefetches (forward order is the wrong direction there) nor releases, nor counts as a use (torch's
early stop may cut it short before its post-hook): the backward that follows reads the same parameters and
releases them when their gradients are ready, so each unit is still gathered twice per micro-batch.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.distributed as dist

from megaengine.parallel import comm
from megaengine.parallel.params import full_shape, param_info, set_param_info
from megaengine.zero.buffers import Bucket

FREE, GATHERING, READY = "free", "gathering", "ready"

# The first layer's inputs never require grad; its backward pre-hook still fires, which is all we need.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs")


def _recomputing() -> bool:
    """A forward inside a backward pass is activation recomputation (any checkpoint implementation)."""
    return torch._C._current_graph_task_id() != -1


def _backward_hook_fires(output) -> bool:
    outs = output if isinstance(output, (tuple, list)) else (output,)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in outs)


def split_persistent(chunks, params: list, threshold: int):
    """(whole params, [(module, unit params, unit or None)]): each non-persistent param belongs to its first
    owner module. Parameters built sharded (zero_init) come with their unit, taken as it is."""
    trainable = {id(p) for p in params}
    owned, units = set(), []
    for chunk in chunks:
        for module in chunk.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in trainable and id(p) not in owned]
            made = {id(param_info(p).zero_unit): param_info(p).zero_unit for p in own if param_info(p).zero_unit}
            for u in made.values():
                units.append((module, u.params, u))
                owned.update(id(p) for p in u.params)
            new = [p for p in own if id(p) not in owned and p.numel() > threshold]
            owned.update(id(p) for p in new)
            if new:
                units.append((module, new, None))
    whole = [p for p in params if id(p) not in owned]
    return whole, units


class ParamGatherer:
    def __init__(self, unit_modules: list, dp_group, first_index: int, *, prefetch_numel: int,
                 max_live_numel: int):
        self.dp_group = dp_group
        size, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
        self.prefetch_numel, self.max_live_numel = prefetch_numel, max_live_numel
        self.units: list[Bucket] = []
        self.unit_of: dict[int, Bucket] = {}
        self.uses: dict[int, list[Bucket]] = {}  # id(module) -> units its forward needs
        for i, (module, params, made) in enumerate(unit_modules):
            if made is not None:  # built sharded: only the shard exists
                if (made.shard_numel * size, made.lo) != (made.numel, rank * made.shard_numel):
                    raise ValueError("the model was built under zero_init over another data-parallel group than "
                                     f"the optimizer's ({size} ranks): build it with the optimizer's dp group")
                u, u.index, u.state, u.group = made, first_index + i, FREE, dp_group
            else:
                u = Bucket(first_index + i, params, size, rank, dp_group)
                u.shard, u.state = u.data[u.lo:u.hi].clone(), READY
            u.work, u.active = None, 0  # active: modules inside their forward using it
            self.units.append(u)
            self.unit_of.update({id(p): u for p in params})
        self.order: list[Bucket] = []  # units in first-forward order, frozen at the first backward
        self.traced = False
        self.pinned = False  # inside all_gathered(): nothing is released
        self.live = sum(u.numel for u in self.units if u.state != FREE)
        self.hooks = []
        for module in dict.fromkeys(m for m, _, _ in unit_modules):
            self._hook(module)
        for u in self.units:
            self.hooks += [p.register_hook(functools.partial(self._before_accumulate, u)) for p in u.params]
        self.release_all()

    def _hook(self, module) -> None:
        units = []
        for p in module.parameters(recurse=False):
            u = self.unit_of.get(id(p))
            if u is not None and u not in units:
                units.append(u)
        self._install(module, units)

    def _install(self, module, units: list) -> None:
        self.uses[id(module)] = units
        self.hooks += [module.register_forward_pre_hook(self._pre_forward),
                       module.register_forward_hook(self._post_forward),
                       module.register_full_backward_pre_hook(self._pre_backward)]

    def hook_sharing_modules(self, chunks) -> None:
        """Modules that hold another unit's parameter as their own (tied weights) gather that unit too."""
        for chunk in chunks:
            for module in chunk.modules():
                if id(module) not in self.uses and any(id(p) in self.unit_of
                                                       for p in module.parameters(recurse=False)):
                    self._hook(module)

    def register_external_parameter(self, module, param) -> None:
        u = self.unit_of.get(id(param))
        if u is None:
            return  # a whole (persistent) parameter: always present
        if id(module) not in self.uses:
            self._install(module, [])
        if u not in self.uses[id(module)]:
            self.uses[id(module)].append(u)

    # -- unit states ---------------------------------------------------------------------------------------
    def _fetch(self, u: Bucket) -> None:
        if u.state != FREE:
            return
        u.data.untyped_storage().resize_(u.numel * u.data.element_size())
        u.work = comm.all_gather_into_tensor(u.data, u.shard, self.dp_group, async_op=True)
        u.state = GATHERING
        self.live += u.numel

    def _wait(self, u: Bucket) -> None:
        self._fetch(u)
        if u.state == GATHERING:
            if u.work is not None:
                u.work.wait()
            u.work, u.state = None, READY
            with torch.no_grad():
                for p in u.params:
                    s, k = u.offsets[p]
                    p.data = u.data[s:s + k].view(full_shape(p))

    def _release(self, u: Bucket) -> None:
        if u.state == FREE or self.pinned:
            return
        if u.state == GATHERING and u.work is not None:
            u.work.wait()
        for p in u.params:
            set_param_info(p, full_shape=full_shape(p))
            p.data = torch.empty(0, dtype=u.dtype, device=u.device)
        u.data.untyped_storage().resize_(0)
        u.work, u.state = None, FREE
        self.live -= u.numel

    def prefetch_first(self, units: set, backward: bool) -> None:
        """Start gathering the first of `units` (ids) that a forward (or a backward: the last ones) will use,
        up to the prefetch budget: called by the pipeline before it waits on p2p (ZeroOptimizer.prefetch)."""
        if not self.traced:
            return
        todo = [u for u in self.order if id(u) in units]
        budget = 0
        for u in reversed(todo) if backward else todo:
            if budget >= self.prefetch_numel or (u.state == FREE and self.live + u.numel > self.max_live_numel):
                break
            budget += u.numel
            self._fetch(u)

    def _prefetch(self, current: list, step: int) -> None:
        if not self.traced or not current:
            return
        idx = [self.order.index(u) for u in current if u in self.order]
        if not idx:
            return
        i, budget = (max(idx) if step > 0 else min(idx)) + step, 0
        while 0 <= i < len(self.order) and budget < self.prefetch_numel:
            u = self.order[i]
            if u.state == FREE and self.live + u.numel > self.max_live_numel:
                break
            budget += u.numel
            self._fetch(u)
            i += step

    # -- hooks ----------------------------------------------------------------------------------------------
    def _pre_forward(self, module, args) -> None:
        units = self.uses[id(module)]
        recomputing = _recomputing()
        for u in units:
            if not self.traced and u not in self.order:
                self.order.append(u)
            self._wait(u)
            u.active += not recomputing
        if not recomputing:
            self._prefetch(units, +1)

    def _post_forward(self, module, args, output) -> None:
        if _recomputing():
            return
        # Without a backward pre-hook to gather them again (torch fires one only for a tensor output, or a
        # tuple or list of them, requiring grad: not e.g. a router's dataclass of routing tensors), the
        # backward would read released weights: keep them until their gradients arrive.
        keep = torch.is_grad_enabled() and not _backward_hook_fires(output)
        for u in self.uses[id(module)]:
            u.active -= 1
            if u.active == 0 and not keep:  # an enclosing module that reads it too (tied weights) keeps it
                self._release(u)

    def _pre_backward(self, module, grad_output) -> None:
        self.traced = True
        units = self.uses[id(module)]
        for u in units:
            self._wait(u)
        self._prefetch(units, -1)

    def _before_accumulate(self, u: Bucket, grad):
        """Accumulating a gradient needs the parameter's full shape. A pipeline's split backward computes
        weight gradients (W) after the unit was released (they read activations and output gradients, not
        weights): gather it again for them."""
        if u.state != READY:
            self._wait(u)
        return grad

    def on_grads_ready(self, bucket: Bucket) -> None:
        if bucket.shard is not None:
            self._release(bucket)

    def release_all(self) -> None:
        for u in self.units:
            u.active = 0
            self._release(u)

    @contextlib.contextmanager
    def all_gathered(self):
        for u in self.units:
            self._wait(u)
        self.pinned = True
        try:
            yield
        finally:
            self.pinned = False
            self.release_all()

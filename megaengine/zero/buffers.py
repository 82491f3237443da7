"""Flat parameter/gradient buckets and the bucketed data-parallel gradient reduction (Megatron's
param_and_grad_buffer, DeepSpeed's reduce buckets).

Layout: trainable parameters, in reverse registration order (about the order backward produces their
gradients), are packed into buckets of about `bucket_size` elements and one dtype, each padded to a multiple
of dp so it is reduce-scattered on its own. A bucket owns one flat tensor of the parameter dtype; its
parameters become views of it. With sharding, rank r owns the r-th 1/dp slice of every bucket (`lo:hi`).
Each bucket has a `Placement`: the group its gradient is reduced (and its state sharded) over. That is dp for
every parameter but MoE experts, which are replicas only over the expert-data-parallel group (the ranks holding
the same experts); their buckets are reduced over it, and still averaged over dp (`GradReducer.dp_size`).

Gradients: a post-accumulate-grad hook adds each parameter's gradient into its slice of an fp32 tensor (the
"main grad") and drops `param.grad`, so accumulation over micro-batches is in fp32.
- `keep_full_grads` (stages 0 and 1): one fp32 buffer holds every bucket's full gradient. A bucket is reduced
  once per step, in the last micro-batch: as soon as its last gradient arrives with `overlap`, else in
  `finish()`. Stage 0 all-reduces; stage 1 reduce-scatters and keeps its slice.
- otherwise (stages 2 and 3): a bucket's fp32 staging tensor lives only while it fills and is reduced, every
  micro-batch, and the reduced slice is added into a persistent fp32 shard (`grad_shard`). At most
  `max_inflight` buckets wait on their reduction, so no rank holds a full gradient.
Collectives are issued in bucket-completion order, which is the same on every dp rank for the same graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaengine.parallel import comm


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Placement:
    """Where a bucket's gradient is reduced: `group` (None: the default group), split into `shards` slices of
    which this rank owns slice `rank` (1 and 0: the whole bucket, as in stage 0)."""
    group: object = None
    shards: int = 1
    rank: int = 0


class Bucket:
    """Parameters of one dtype packed into one flat tensor of `numel` (a multiple of `shards`) elements,
    reduced over `group`."""

    def __init__(self, index: int, params: list, shards: int, rank: int, group=None):
        self.index, self.group = index, group
        self.params = params
        self.dtype, self.device = params[0].dtype, params[0].device
        self.offsets: dict = {}  # param -> (start, numel) inside the flat bucket
        n = 0
        for p in params:
            self.offsets[p] = (n, p.numel())
            n += p.numel()
        self.numel = pad_to(n, shards)
        size = self.numel // shards
        self.lo, self.hi = rank * size, (rank + 1) * size  # this rank's slice (the whole bucket when shards=1)
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p in params:
                s, k = self.offsets[p]
                self.data[s:s + k].copy_(p.detach().reshape(-1))
                p.data = self.data[s:s + k].view_as(p)
        self.shard: torch.Tensor | None = None  # stage 3: the only copy of the params between uses
        self.master_offset = 0  # where [lo, hi) starts in the optimizer's flat shard
        self.grad: torch.Tensor | None = None  # fp32 full gradient (view of the buffer, or staging)
        self.arrived: set[int] = set()  # id() of params whose gradient arrived in this round
        self.launched = False

    @property
    def shard_numel(self) -> int:
        return self.hi - self.lo

    def own_params(self):
        """(param, a, b, offset_in_param): parts of params inside [lo, hi), in shard-local coordinates."""
        for p in self.params:
            s, k = self.offsets[p]
            a, b = max(s, self.lo), min(s + k, self.hi)
            if a < b:
                yield p, a - self.lo, b - self.lo, a - s


def build_buckets(params: list, bucket_size: int, placement, *, alone=lambda p: False) -> list:
    """Greedy packing in the given order; a new bucket on dtype or placement change, at `bucket_size` elements,
    and around each param for which `alone(p)` (the tied embedding: both pipeline ends must shard it
    identically). `placement(p)`: the param's `Placement`."""
    groups, cur, n = [], [], 0
    for p in params:
        if cur and (alone(p) or alone(cur[-1]) or p.dtype != cur[-1].dtype or n >= bucket_size
                    or placement(p) != placement(cur[-1])):
            groups.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p.numel()
    if cur:
        groups.append(cur)
    return [Bucket(i, g, placement(g[0]).shards, placement(g[0]).rank, placement(g[0]).group)
            for i, g in enumerate(groups)]


class GradReducer:
    """Main-grad hooks and the bucketed dp reduction (see the module docstring): each bucket is reduced over its
    own group, and every gradient is averaged over `dp_group`'s size."""

    def __init__(self, buckets: list, dp_group, *, sharded: bool, keep_full_grads: bool, overlap: bool,
                 use_reduce_scatter: bool = True, prescale: bool = True, max_inflight: int = 2):
        self.buckets, self.dp_group = buckets, dp_group
        self.dp_size = torch.distributed.get_world_size(dp_group)
        self.sharded, self.keep_full, self.overlap = sharded, keep_full_grads, overlap
        self.use_reduce_scatter, self.prescale, self.max_inflight = use_reduce_scatter, prescale, max_inflight
        self.is_last_microbatch = True
        self.on_grads_ready = None  # callback(bucket) when a bucket's reduction starts (stage 3 frees params)
        self.bucket_of = {id(p): b for b in buckets for p in b.params}
        self.inflight: list = []
        device = buckets[0].device if buckets else torch.device("cpu")
        if keep_full_grads:
            self.grad_buffer = torch.zeros(sum(b.numel for b in buckets), dtype=torch.float32, device=device)
            n = 0
            for b in buckets:
                b.grad = self.grad_buffer[n:n + b.numel]
                n += b.numel
            self.grad_shard = None
        else:
            self.grad_buffer = None
            self.grad_shard = torch.zeros(sum(b.shard_numel for b in buckets), dtype=torch.float32, device=device)
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in buckets for p in b.params]

    # -- gradients arriving ------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        b = self.bucket_of[id(p)]
        g, p.grad = p.grad, None
        s, k = b.offsets[p]
        if self.keep_full:
            if b.launched:
                raise RuntimeError(
                    "a gradient arrived after its bucket was reduced: mark every micro-batch but the last with "
                    "opt.set_is_last_microbatch(False) or `with opt.no_sync():`")
            b.grad[s:s + k].add_(g.reshape(-1))
            if not (self.is_last_microbatch and self.overlap):
                return
        else:
            if b.launched:  # its reduction from the previous micro-batch must land before the staging is reused
                self._wait_bucket(b)
            elif id(p) in b.arrived:  # a new micro-batch while this bucket missed a gradient: reduce what it has
                self._launch(b)
                self._wait_bucket(b)
            if b.grad is None:
                b.grad = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
            b.grad[s:s + k].copy_(g.reshape(-1))
        b.arrived.add(id(p))
        if len(b.arrived) == len(b.params):
            self._launch(b)
            if not self.overlap:
                self.wait_all()

    # -- reduction ------------------------------------------------------------------------------------------
    def _launch(self, b: Bucket) -> None:
        if self.prescale and self.dp_size > 1:
            b.grad.div_(self.dp_size)
        if not self.sharded or not self.use_reduce_scatter:
            out = None
            work = comm.all_reduce(b.grad, b.group, async_op=True)
        else:
            out = torch.empty(b.shard_numel, dtype=torch.float32, device=b.device)
            work = comm.reduce_scatter_tensor(out, b.grad, b.group, async_op=True)
        b.launched = True
        self.inflight.append((b, work, out))
        if self.on_grads_ready is not None:
            self.on_grads_ready(b)
        if not self.keep_full:
            while len(self.inflight) > self.max_inflight:
                self._complete(*self.inflight.pop(0))

    def _complete(self, b: Bucket, work, out) -> None:
        if work is not None:
            work.wait()
        scattered = out is not None  # reduce-scatter output, separate from the bucket's gradient
        if not scattered:
            out = b.grad[b.lo:b.hi]
        if not self.prescale and self.dp_size > 1:
            (out if self.sharded else b.grad).div_(self.dp_size)
        if self.keep_full:
            if scattered:
                b.grad[b.lo:b.hi].copy_(out)
        else:
            self.grad_shard[b.master_offset:b.master_offset + b.shard_numel].add_(out)
            b.grad = None
            b.launched = False
        b.arrived.clear()

    def _wait_bucket(self, b: Bucket) -> None:
        for i, entry in enumerate(self.inflight):
            if entry[0] is b:
                self._complete(*self.inflight.pop(i))
                return

    def wait_all(self) -> None:
        while self.inflight:
            self._complete(*self.inflight.pop(0))

    def finish(self) -> None:
        """Reduce every bucket not reduced yet (in bucket order, the same on every rank) and wait for all."""
        for b in self.buckets:
            if (self.keep_full and not b.launched) or (not self.keep_full and b.grad is not None and not b.launched):
                self._launch(b)
        self.wait_all()

    def zero(self) -> None:
        self.wait_all()
        if self.grad_buffer is not None:
            self.grad_buffer.zero_()
        if self.grad_shard is not None:
            self.grad_shard.zero_()
        for b in self.buckets:
            b.launched = False
            b.arrived.clear()
            if not self.keep_full:
                b.grad = None

    def grad_piece(self, b: Bucket) -> torch.Tensor:
        """The reduced fp32 gradient of the bucket's own slice [lo, hi)."""
        if self.keep_full:
            return b.grad[b.lo:b.hi]
        return self.grad_shard[b.master_offset:b.master_offset + b.shard_numel]

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

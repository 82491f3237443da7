"""The data-parallel optimizer: plain data parallel (stage 0) and ZeRO stages 1-3, AdamW, mixed precision.

    opt = ZeroOptimizer(model_chunks, stage=1, lr=3e-4, weight_decay=0.1, clip_grad=1.0,
                        dp_group=ps.dp_group, tp_group=ps.tp_group, pp_group=ps.pp_group)
    for it in ...:
        opt.zero_grad()
        for i, mb in enumerate(micro_batches):
            opt.set_is_last_microbatch(i == len(micro_batches) - 1)   # or `with opt.no_sync():` for i < last
            loss = model(mb) / len(micro_batches)
            opt.scale_loss(loss).backward()          # or the pipeline executor's autograd.backward
        grad_norm, skipped = opt.step(lr=lr_now)     # reduce, unscale, inf check, clip, AdamW, publish params

What each stage keeps on a rank (P parameters, N = dp, bf16 parameters):
    stage 0: 16-bit params, full fp32 grads (all-reduced), full fp32 master + moments
    stage 1: as 0, but master + moments are this rank's 1/N shard; grads reduce-scattered, params all-gathered
    stage 2: as 1, and grads are reduced every micro-batch into the fp32 shard (no full gradient is kept)
    stage 3: as 2, and parameters are shards too, gathered around each module's forward and backward
             (stage3.py); parameters with <= `param_persistence_threshold` elements stay whole.

Rules the caller relies on:
- Gradients are summed over micro-batches and averaged over dp: divide the loss by the number of micro-batches.
- fp16 parameters get a dynamic loss scaler unless `loss_scaler` is given; bf16/fp32 need none. A step whose
  gradients hold inf/nan on any rank is skipped on every rank (`skipped=True`) and the scale is lowered.
- The grad norm (returned before clipping, as Megatron reports it) counts every parameter once: tp shards on
  every tp rank, replicated ones on tp rank 0, never a tied copy (each parameter's `ParamInfo`, see
  megaengine.parallel.params); summed over tp and pp (and dp when the gradients are sharded).
- Weight decay (decoupled, AdamW) skips parameters with ndim < 2 (biases, norm weights), as Megatron does.
- Pipeline tied embeddings (`ParamInfo.tied`) get their own bucket so both ends shard them identically;
  between `finish_grad_sync()` and `step()`, `sync_tied_grads(embedding_group)` sums their gradients.
- MoE experts (`ParamInfo.ep_dim`) differ across the `ep_group` and are replicated over `expert_dp_group` only:
  their own buckets are reduced and sharded over it (ZeRO's 1/N is then 1/expert_dp), averaged over dp like every
  gradient (each expert's owner holds the sum over its ep group's tokens). They count once in the grad norm: at
  stage 0 summed over ep before the max over dp, at stages 1-2 in the sum over dp. No stage 3 with ep > 1.
- Stage 3 parameters are only valid inside their module's forward/backward; use `gathered_params()` to read them.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from megaengine.parallel import comm
from megaengine.parallel.mesh import ConfigError
from megaengine.parallel.params import full_shape, param_info
from megaengine.zero.buffers import GradReducer, Placement, build_buckets
from megaengine.zero.loss_scale import DynamicLossScaler, loss_scaler_for

log = logging.getLogger("megaengine.zero")

# The fp32 state kept per parameter element; checkpoints store one tensor of each kind per parameter.
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def trainable_params(model_chunks) -> list:
    """Unique trainable parameters of all chunks, in registration order."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    seen, out = set(), []
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _runs(flags: list) -> list:
    """[(a, b, flag)] with adjacent equal flags merged; `flags` is a list of (a, b, flag)."""
    out = []
    for a, b, f in flags:
        if out and out[-1][2] == f and out[-1][1] == a:
            out[-1] = (out[-1][0], b, f)
        else:
            out.append((a, b, f))
    return out


def adamw_(p, g, m, v, *, lr, beta1, beta2, eps, step, weight_decay, decay_ranges, decoupled=True) -> None:
    """torch.optim.AdamW's update on flat fp32 tensors; weight decay only on `decay_ranges`."""
    if weight_decay:
        if decoupled:
            for a, b in decay_ranges:
                p[a:b].mul_(1 - lr * weight_decay)
        else:  # Adam with L2 regularisation (DeepSpeed's adam_w_mode=false)
            g = g.clone()
            for a, b in decay_ranges:
                g[a:b].add_(p[a:b], alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias1)


class ZeroOptimizer:
    def __init__(self, model_chunks, *, stage: int = 0, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adam_w_mode: bool = True, clip_grad: float = 0.0,
                 dp_group=None, tp_group=None, pp_group=None, expert_dp_group=None, ep_group=None,
                 reduce_bucket_size: int = 500_000_000, overlap_comm: bool = True, reduce_scatter: bool = True,
                 prescale_gradients: bool = False, loss_scaler=None, offload_optimizer: bool = False,
                 prefetch_bucket_size: int = 50_000_000, param_persistence_threshold: int = 100_000,
                 max_live_parameters: int = 1_000_000_000):
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
        if stage == 3 and _group_size(ep_group) > 1:
            raise ConfigError("zero_optimization.stage=3 with expert parallelism (ep > 1) is not supported: use "
                              "stage 1 or 2 with --expert-model-parallel-size > 1.")
        if offload_optimizer and stage == 0:
            raise ConfigError('zero_optimization.offload_optimizer needs stage >= 1 (got stage 0); set "stage": 1 '
                              'or higher, or remove offload_optimizer.')
        self.chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.stage, self.lr, self.clip_grad = stage, lr, clip_grad
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled = eps, weight_decay, adam_w_mode
        self.dp_group, self.tp_group, self.pp_group = dp_group, tp_group, pp_group
        self.dp_size, self.dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
        self.ep_group = ep_group if _group_size(ep_group) > 1 else None
        self.expert_dp_group = expert_dp_group if self.ep_group is not None else dp_group
        self.tp_rank = _group_rank(tp_group)
        params = trainable_params(self.chunks)
        if not params:
            raise ValueError("the model has no trainable parameters")
        if stage != 3 and any(param_info(p).zero_unit is not None for p in params):
            raise ConfigError(f"the model was built sharded (megaengine.zero_init) but zero_optimization.stage is "
                              f"{stage}; a sharded model needs stage 3 (or build it outside zero_init).")
        self.device = params[0].device
        dtypes = {p.dtype for p in params}
        if loss_scaler is None and torch.float16 in dtypes:
            loss_scaler = DynamicLossScaler()
        self.loss_scaler = loss_scaler
        self._broadcast_from_dp0(params)

        self.gatherer = None
        if stage == 3:
            from megaengine.zero.stage3 import ParamGatherer, split_persistent
            whole, unit_modules = split_persistent(self.chunks, params, param_persistence_threshold)
        else:
            whole, unit_modules = params, []
        self.buckets = build_buckets(whole[::-1], int(reduce_bucket_size), self._placement,
                                     alone=lambda p: param_info(p).tied is not None)
        if stage == 3:
            self.gatherer = ParamGatherer(unit_modules, self.dp_group, len(self.buckets),
                                          prefetch_numel=int(prefetch_bucket_size),
                                          max_live_numel=int(max_live_parameters))
            self.gatherer.hook_sharing_modules(self.chunks)
            self.buckets += self.gatherer.units
        offset = 0
        for b in self.buckets:
            b.master_offset = offset
            offset += b.shard_numel
        self.reducer = GradReducer(self.buckets, dp_group, sharded=stage >= 1, keep_full_grads=stage <= 1,
                                   overlap=overlap_comm, use_reduce_scatter=reduce_scatter,
                                   prescale=prescale_gradients)
        if self.gatherer is not None:
            self.reducer.on_grads_ready = self.gatherer.on_grads_ready

        self.opt_device = torch.device("cpu") if offload_optimizer else self.device
        self.master = torch.empty(offset, dtype=torch.float32, device=self.opt_device)
        for b in self.buckets:
            self.master[b.master_offset:b.master_offset + b.shard_numel].copy_(self._own_param_data(b))
        if offload_optimizer and torch.cuda.is_available():
            self.master = self.master.pin_memory()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.step_count = 0
        self._segments = [self._bucket_segments(b) for b in self.buckets]
        self._synced = False
        self._chunk_units: dict[int, set] = {}  # chunk index -> ids of its stage-3 units (prefetch)

    @classmethod
    def from_config(cls, model_chunks, optim, *, dp_group=None, tp_group=None, pp_group=None, expert_dp_group=None,
                    ep_group=None) -> "ZeroOptimizer":
        """The optimizer an `OptimConfig` (megaengine.zero.config) describes."""
        z = optim.zero
        return cls(
            model_chunks, stage=z.stage, lr=optim.lr, betas=optim.betas, eps=optim.eps,
            weight_decay=optim.weight_decay, adam_w_mode=optim.adam_w_mode, clip_grad=optim.clip_grad,
            dp_group=dp_group, tp_group=tp_group, pp_group=pp_group, expert_dp_group=expert_dp_group,
            ep_group=ep_group, reduce_bucket_size=z.reduce_bucket_size,
            overlap_comm=z.overlap_comm, reduce_scatter=z.reduce_scatter, prescale_gradients=optim.prescale_gradients,
            loss_scaler=loss_scaler_for(optim.fp16), offload_optimizer=z.offload_optimizer == "cpu",
            prefetch_bucket_size=z.stage3_prefetch_bucket_size,
            param_persistence_threshold=z.stage3_param_persistence_threshold,
            max_live_parameters=z.stage3_max_live_parameters)

    # -- setup helpers ------------------------------------------------------------------------------------
    def _replica_group(self, p):
        """The ranks holding the same values of `p`: expert_dp for MoE experts, else dp."""
        return self.expert_dp_group if param_info(p).expert_parallel else self.dp_group

    def _placement(self, p) -> Placement:
        group = self._replica_group(p)
        if self.stage == 0:
            return Placement(group)
        return Placement(group, dist.get_world_size(group), dist.get_rank(group))

    def _broadcast_from_dp0(self, params) -> None:
        """Start every replica from the first replica's weights, as DDP does."""
        if self.dp_size == 1:
            return
        with torch.no_grad():
            for p in params:
                if param_info(p).zero_unit is not None:  # a model built sharded was made equal as it was built
                    continue
                group = self._replica_group(p)
                if dist.get_world_size(group) > 1:
                    comm.broadcast(p.data, 0 if group is None else dist.get_global_rank(group, 0), group)

    def _own_param_data(self, b) -> torch.Tensor:
        return b.shard if b.shard is not None else b.data[b.lo:b.hi]

    def _bucket_segments(self, b):
        """Weight-decay and grad-norm ranges inside the bucket's own slice, and whether it holds experts."""
        decay, counted = [], []
        for p, a, e, _ in b.own_params():
            decay.append((a, e, len(full_shape(p)) >= 2))
            counted.append((a, e, _counts_in_norm(p, self.tp_rank)))
        decay_ranges = [(a, e) for a, e, f in _runs(decay) if f]
        norm_ranges = [(a, e) for a, e, f in _runs(counted) if f]
        return decay_ranges, norm_ranges, param_info(b.params[0]).expert_parallel

    # -- per micro-batch -----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.reducer.zero()
        for chunk in self.chunks:
            for p in chunk.parameters():
                p.grad = None
        self._synced = False

    def set_is_last_microbatch(self, is_last: bool) -> None:
        """Stages 0-1 reduce gradients only in the last micro-batch (overlapped with its backward)."""
        self.reducer.is_last_microbatch = bool(is_last)

    @contextlib.contextmanager
    def no_sync(self):
        previous = self.reducer.is_last_microbatch
        self.reducer.is_last_microbatch = False
        try:
            yield
        finally:
            self.reducer.is_last_microbatch = previous

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.loss_scaler is None else loss * self.loss_scaler.scale

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.loss_scaler is None else self.loss_scaler.scale

    # -- the step ----------------------------------------------------------------------------------------
    def finish_grad_sync(self) -> None:
        """Finish the dp reduction (idempotent until the next zero_grad)."""
        if not self._synced:
            self.reducer.finish()
            if self.gatherer is not None:
                self.gatherer.release_all()
            self._synced = True

    def main_grad(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's part of `param`'s reduced fp32 gradient (flat; empty where this rank holds none)."""
        b = self.reducer.bucket_of.get(id(param))
        if b is not None:
            for p, a, e, _ in b.own_params():
                if p is param:
                    return self.reducer.grad_piece(b)[a:e]
        return torch.empty(0, dtype=torch.float32, device=self.device)

    def sync_tied_grads(self, embedding_group) -> None:
        """Sum the gradients of pipeline-tied parameters over the group holding their copies (Megatron's
        embedding group), so both copies take the same step and never drift. Call after finish_grad_sync()."""
        if embedding_group is None:
            return
        for chunk in self.chunks:
            for p in chunk.parameters():
                if param_info(p).tied is not None:
                    comm.all_reduce(self.main_grad(p), embedding_group)

    def step(self, lr: float | None = None) -> tuple[float, bool]:
        """Reduce, unscale, check overflow on all ranks, clip, AdamW, publish. Returns (grad_norm, skipped)."""
        lr = self.lr if lr is None else lr
        self.finish_grad_sync()
        grads = [self.reducer.grad_piece(b) for b in self.buckets]
        if self.loss_scaler is not None and self.loss_scaler.scale != 1.0:
            for g in grads:
                g.mul_(1.0 / self.loss_scaler.scale)
        norm, overflow = self._grad_norm(grads)
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow)
        elif overflow:
            log.warning("non-finite gradient norm (%s): skipping the step on every rank", norm)
        if overflow:
            return norm, True
        if self.clip_grad > 0:
            coef = self.clip_grad / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        self.step_count += 1
        for b, g, (decay_ranges, _, _) in zip(self.buckets, grads, self._segments):
            sl = slice(b.master_offset, b.master_offset + b.shard_numel)
            adamw_(self.master[sl], g.to(self.opt_device), self.exp_avg[sl], self.exp_avg_sq[sl], lr=lr,
                   beta1=self.beta1, beta2=self.beta2, eps=self.eps, step=self.step_count,
                   weight_decay=self.weight_decay, decay_ranges=decay_ranges, decoupled=self.decoupled)
        self._publish_params()
        return norm, False

    def _grad_norm(self, grads) -> tuple[float, bool]:
        # [sum of squares, non-finite count] and, with expert parallelism, the experts' squares apart.
        t = torch.zeros(2 if self.ep_group is None else 3, dtype=torch.float32, device=self.device)
        for g, (_, norm_ranges, experts) in zip(grads, self._segments):
            for a, e in norm_ranges:
                t[2 if experts and self.ep_group is not None else 0] += torch.dot(g[a:e], g[a:e])
            t[1] += (~torch.isfinite(g.sum())).float()
        for group in (self.tp_group, self.pp_group):
            if group is not None:
                comm.all_reduce(t, group)
        # Sharded gradients: each rank summed only its slice. Replicated ones (stage 0): the max keeps the norm
        # exact and still makes an overflow seen by one rank skip the step on all; the ep ranks' experts differ,
        # so their squares (and overflows) are summed over ep first.
        if self.stage == 0 and self.ep_group is not None:
            comm.all_reduce(t[1:], self.ep_group)
        comm.all_reduce(t, self.dp_group, op=dist.ReduceOp.SUM if self.stage >= 1 else dist.ReduceOp.MAX)
        values = t.tolist()
        sq, bad = sum(values) - values[1], values[1]
        norm = math.sqrt(sq) if sq >= 0 else float("nan")
        return norm, bad > 0 or not math.isfinite(norm)

    def _publish_params(self) -> None:
        """Copy the updated fp32 master into the model's (16-bit) parameters, all-gathering the shards."""
        works = []
        with torch.no_grad():
            for b in self.buckets:
                new = self.master[b.master_offset:b.master_offset + b.shard_numel].to(self.device, b.dtype)
                if b.shard is not None:  # stage 3: only the shard lives between uses
                    b.shard.copy_(new)
                elif self.stage == 0:
                    b.data.copy_(new)
                else:
                    works.append(comm.all_gather_into_tensor(b.data, new, b.group, async_op=True))
            for w in works:
                if w is not None:
                    w.wait()

    # -- stage 3 access ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered_params(self):
        """Inside, every parameter holds its full value (stage 3 gathers; other stages have nothing to do)."""
        if self.gatherer is None:
            yield
        else:
            with self.gatherer.all_gathered():
                yield

    def prefetch(self, action) -> None:
        """Stage 3 in a pipeline: start gathering what the next compute `action` (pipeline.schedules.Action) of
        chunk `action.chunk` needs first; run_pipeline calls it before each p2p wait. W needs no weights."""
        if self.gatherer is None or action.kind == "W":
            return
        if action.chunk not in self._chunk_units:
            self._chunk_units[action.chunk] = {id(u) for module in self.chunks[action.chunk].modules()
                                               for u in self.gatherer.uses.get(id(module), ())}
        self.gatherer.prefetch_first(self._chunk_units[action.chunk], backward=action.kind != "F")

    def register_external_parameter(self, module: nn.Module, param: torch.Tensor) -> None:
        """Stage 3: `module`'s forward reads `param` although another module owns it (tied embeddings)."""
        if self.gatherer is not None:
            self.gatherer.register_external_parameter(module, param)

    # -- per-parameter state, for checkpoints that reshard ---------------------------------------------------
    def param_states(self, params) -> dict:
        """{param: {"master", "exp_avg", "exp_avg_sq"}}: the whole fp32 state of each of `params` on this
        rank (its tp shard, in the parameter's shape), as fresh tensors. Collective over dp at stage >= 1: every
        dp rank calls it, with any `params`. Buckets are all-gathered one at a time, so besides the result a
        rank holds at most one bucket's full state."""
        wanted = {id(p) for p in params}
        out = {}
        for b in self.buckets:
            full = {name: self._gathered(b, getattr(self, name)) for name in STATE_KINDS}
            for p in b.params:
                if id(p) in wanted:
                    s, k = b.offsets[p]
                    out[p] = {name: t[s:s + k].view(full_shape(p)).clone() for name, t in full.items()}
        return out

    def _gathered(self, b, flat: torch.Tensor) -> torch.Tensor:
        own = flat[b.master_offset:b.master_offset + b.shard_numel]
        if b.shard_numel == b.numel:  # stage 0: the rank holds the whole bucket
            return own
        full = torch.empty(b.numel, dtype=torch.float32, device=self.device)
        comm.all_gather_into_tensor(full, own.to(self.device), b.group)
        return full

    def load_param_state(self, param: torch.Tensor, state: dict) -> None:
        """Set `param`'s fp32 state from whole tensors in its shape (as `param_states` returns them); this
        rank keeps only its own range. Local; call `publish_params()` once every parameter is loaded."""
        b = self.reducer.bucket_of[id(param)]
        numel = b.offsets[param][1]
        for name in STATE_KINDS:
            if state[name].numel() != numel:
                raise ValueError(f"{name}: {state[name].numel()} elements for a parameter of {numel}")
        for p, a, e, off in b.own_params():
            if p is param:
                for name in STATE_KINDS:
                    flat = state[name].reshape(-1)[off:off + e - a]
                    getattr(self, name)[b.master_offset + a:b.master_offset + e].copy_(flat)

    def publish_params(self) -> None:
        """Copy the fp32 master into the model's parameters (collective over dp at stage >= 1)."""
        self._publish_params()

    # -- memory ------------------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes this rank holds now, counted from the tensors: parameters, gradients, optimizer state."""
        storages = {}
        for chunk in self.chunks:
            for p in chunk.parameters():
                st = p.untyped_storage()
                if st.nbytes():
                    storages[st.data_ptr()] = st.nbytes()
        param_bytes = sum(storages.values())
        param_bytes += sum(_nbytes(b.shard) for b in self.buckets if b.shard is not None)
        grad_bytes = _nbytes(self.reducer.grad_buffer) + _nbytes(self.reducer.grad_shard)
        if not self.reducer.keep_full:
            grad_bytes += sum(_nbytes(b.grad) for b in self.buckets)
        grad_bytes += sum(_nbytes(p.grad) for chunk in self.chunks for p in chunk.parameters())
        optimizer_bytes = sum(_nbytes(t) for t in (self.master, self.exp_avg, self.exp_avg_sq))
        return {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes}


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _counts_in_norm(p, tp_rank: int) -> bool:
    info = param_info(p)
    return not info.is_tied_copy and (info.tensor_parallel or tp_rank == 0)

"""Predict one run: per-GPU memory of the busiest rank and a step time.

Memory, for each pipeline rank (tp and dp ranks hold the same), then the largest:
    parameters, gradients, optimizer state   plan/memory.py: exactly what ZeroOptimizer allocates (MoE: the
                                             router and this ep rank's E/ep experts, sharded over expert dp)
    activations per micro-batch              plan/activations.py, summed over the rank's model chunks
    peak activations                         the schedule's own action list, walked: a (micro-batch, chunk)
                                             is held from its F until its backward frees it (BW, or W after
                                             a split B: the graph is kept from B until W)
    recompute working set                    full recomputation materialises one group's activations in
                                             backward
    buffers (estimate)                       stage 2/3: three fp32 staging buckets (one filling, two
                                             reducing); stage 3: gathered units (two layers' plus prefetch,
                                             at most max_live)
    overhead                                 a stated allowance (CUDA context, NCCL, allocator slack)
The total leaves out an offloaded optimizer (it lives in host memory).

Step time (all assumptions are flags of `python -m megaengine.plan`):
    compute    model FLOPs (6N + 12Lhs per token, REFERENCE.md; N the matmul weights a token meets: an MoE
               layer's router and top-k experts, count_parameters' "matmul") plus recomputation's extra forward FLOPs,
               spread over all GPUs at `mfu` of `peak_tflops`, stretched by the pipeline's idle time, which
               the simulator (pipeline/simulate.py) measures on the schedule itself (F = 1, B = 1 +
               recompute, W = 1 units)
    tensor     per layer and micro-batch 4 all-reduces (or all-gather + reduce-scatter pairs with sp) of the
               (s, b, h) activation, ring volume 2(t-1)/t each, plus the recomputed forward's; an MoE layer
               has the attention's 2, and all-reduces its router's and experts' gradients (replicated over tp,
               used on sequence shards) every micro-batch; at intra-node bandwidth when tp fits in a node
    experts    per MoE layer and micro-batch the dispatch and combine (plan/moe.py: alltoall 2 k T h each way
               less the 1/ep kept at home, forward and backward, and the recomputed forward's), at intra-node
               bandwidth when the ep group (ep consecutive dp ranks) fits in a node
    context    per layer and micro-batch, the K/V ring (p2p) or all-to-alls (a2a) of context_parallel/cost.py,
               forward and backward (and the recomputed forward's), at intra-node bandwidth when tp x cp fits
    pipeline   each micro-batch's activation and gradient over each stage boundary
    data       stage 0: all-reduce fp32 gradients once; 1: reduce-scatter fp32 + all-gather params once;
               2: reduce-scatter every micro-batch + all-gather once; 3: reduce-scatter every micro-batch
               and two parameter all-gathers per micro-batch; with ep > 1 expert buckets over the dp/ep expert
               replicas. Overlapped with the backward it runs under (stages 0-1: the last micro-batch's, 2-3:
               all), only the excess counts.
    optimizer  offload: gradients down and parameters up over `host_bandwidth`
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from megaengine.context_parallel.cost import attention_send_bytes
from megaengine.plan import activations as act
from megaengine.plan.layout import Layout
from megaengine.plan.memory import chunk_params, state_bytes
from megaengine.plan.moe import dispatch_bytes, replicated_numel

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gib: float = 80.0
    overhead_gib: float = 2.0
    peak_tflops: float = 989.0
    mfu: float = 0.5
    gpus_per_node: int = 8
    intra_gbs: float = 450.0
    inter_gbs: float = 50.0
    host_gbs: float = 25.0
    device: str = "cuda"


@dataclass(frozen=True)
class Memory:
    pp_rank: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    expert_param_bytes: int  # of param_bytes, the experts' buckets (ep > 1; at ep 1 they share the dense ones)
    optimizer_on_host: bool
    activation_bytes_per_microbatch: float
    peak_activation_bytes: float
    recompute_bytes: float
    buffer_bytes: float
    overhead_bytes: float

    @property
    def total_bytes(self) -> float:
        on_gpu = [self.param_bytes, self.grad_bytes, self.peak_activation_bytes, self.recompute_bytes,
                  self.buffer_bytes, self.overhead_bytes]
        return sum(on_gpu) + (0 if self.optimizer_on_host else self.optimizer_bytes)


def _chunks(config, layout: Layout, rank: int):
    """[(layers, first, last)] of this pipeline rank's model chunks."""
    from megaengine.pipeline.partition import layer_ranges
    p, v = layout.pp, layout.virtual
    return [(r, rank == 0 and c == 0, rank == p - 1 and c == v - 1)
            for c, r in enumerate(layer_ranges(config.num_layers, p, v)[rank])]


@functools.lru_cache(maxsize=256)
def _actions(schedule: str, pp: int, m: int, v: int):
    from megaengine.pipeline.schedules import build
    return build(schedule, pp, m, v)


def peak_held(actions, per_chunk: list[float]) -> float:
    """Most activation bytes held at once: F adds its chunk's, BW (or W, after a split B) frees them."""
    held = peak = 0.0
    for a in actions:
        if a.kind == "F":
            held += per_chunk[a.chunk]
            peak = max(peak, held)
        elif a.kind in ("BW", "W"):
            held -= per_chunk[a.chunk]
    return peak


def rank_memory(config, layout: Layout, rank: int, hw: Hardware) -> Memory:
    chunks = _chunks(config, layout, rank)
    specs = [chunk_params(config, layout.tp, r, first, last, layout.ep) for r, first, last in chunks]
    state = state_bytes(specs, stage=layout.zero_stage, dp=layout.replicas, dtype_bytes=layout.dtype_bytes,
                        bucket_size=layout.bucket_size, persistence_threshold=layout.persistence_threshold,
                        ep=layout.ep)
    e = layout.dtype_bytes
    # a cp rank holds seq/cp tokens of each sequence: every activation term scales with them (no s x s term
    # remains: cp runs without attention dropout, on flash-style kernels)
    kw = dict(seq=config.seq_length // layout.cp, micro_batch=layout.micro_batch, tp=layout.tp, dtype_bytes=e,
              kernels=act.kernels_for(config, hw.device, e))
    per_chunk = [act.chunk_bytes(config, r[1] - r[0], first=first, last=last, first_layer=r[0], ep=layout.ep, **kw)
                 for r, first, last in chunks]
    if layout.pp == 1:
        peak = per_chunk[0]
    else:
        peak = peak_held(_actions(layout.schedule, layout.pp, layout.microbatches, layout.virtual)[rank], per_chunk)
    working = max(act.recompute_working_bytes(config, r[1] - r[0], first_layer=r[0], ep=layout.ep, **kw)
                  for r, _, _ in chunks)
    buffers = 0.0
    if layout.zero_stage >= 2:
        buffers += 3 * state.largest_bucket * 4
    if layout.zero_stage == 3:
        layer = [s.numel for s in chunk_params(config, layout.tp, (0, 1), False, False)
                 if s.numel > layout.persistence_threshold]
        buffers += min(layout.max_live, 2 * sum(layer) + layout.prefetch_size) * e
    return Memory(pp_rank=rank, param_bytes=state.param_bytes, grad_bytes=state.grad_bytes,
                  optimizer_bytes=state.optimizer_bytes, expert_param_bytes=state.expert_numel * e,
                  optimizer_on_host=layout.offload_optimizer,
                  activation_bytes_per_microbatch=sum(per_chunk), peak_activation_bytes=peak,
                  recompute_bytes=working, buffer_bytes=buffers, overhead_bytes=hw.overhead_gib * GiB)


def predict_memory(config, layout: Layout, hw: Hardware = Hardware()) -> Memory:
    """The busiest pipeline rank's memory."""
    return max((rank_memory(config, layout, r, hw) for r in range(layout.pp)), key=lambda m: m.total_bytes)


# ---- step time ----

@dataclass(frozen=True)
class StepTime:
    compute_s: float
    bubble: float  # the pipeline's idle fraction of the compute time
    tp_s: float
    cp_s: float
    ep_s: float  # MoE dispatch and combine
    pp_s: float
    dp_s: float  # exposed (not overlapped) data-parallel communication
    optimizer_s: float
    model_flops: float  # per step, all GPUs
    comm_bytes: float  # per step, this rank: tp + cp + ep + pp + dp volumes (also where overlapped)

    @property
    def step_s(self) -> float:
        return (self.compute_s / (1 - self.bubble) + self.tp_s + self.cp_s + self.ep_s + self.pp_s + self.dp_s
                + self.optimizer_s)

    def mfu(self, world: int, peak_tflops: float) -> float:
        return self.model_flops / (self.step_s * world * peak_tflops * 1e12)


def _recompute_fraction(config, layers_per_chunk: int) -> tuple[float, float]:
    """(share of layers fully recomputed, whether the attention core is), for the extra forward FLOPs."""
    r = config.recompute
    if r.granularity == "selective":
        return 0.0, 1.0
    if r.granularity != "full":
        return 0.0, 0.0
    if r.method == "uniform":
        return 1.0, 0.0
    return min(r.num_layers, layers_per_chunk) / layers_per_chunk, 0.0


@functools.lru_cache(maxsize=512)
def _bubble(schedule: str, pp: int, m: int, v: int, recompute: float) -> float:
    if pp == 1:
        return 0.0
    from megaengine.pipeline.simulate import simulate
    cost = {"F": 1.0 / v, "B": (1.0 + recompute) / v, "W": 1.0 / v}
    sim = simulate(_actions(schedule, pp, m, v), cost)
    return 1 - max(sim.busy) / sim.makespan


def step_time(config, layout: Layout, hw: Hardware, memory: Memory) -> StepTime:
    from megaengine.models import count_parameters
    t, p, d, m, c = layout.tp, layout.pp, layout.replicas, layout.microbatches, layout.cp
    L, h, s, e = config.num_layers, config.hidden_size, config.seq_length, layout.dtype_bytes
    tokens = layout.global_batch * s
    matmul = count_parameters(config, t)["matmul"]
    model_flops = tokens * (6 * matmul + 12 * L * h * s)
    layer_matmul = (matmul - config.padded_vocab_size(t) * h) / L
    full, core = _recompute_fraction(config, L // (p * layout.virtual))
    twice = 2 if layout.schedule == "zb-h1" else 1  # the split backward recomputes in B and again in W
    extra = tokens * L * twice * (full * (2 * layer_matmul + 4 * h * s) + core * 4 * h * s)
    rate = layout.world * hw.peak_tflops * 1e12 * hw.mfu
    compute = (model_flops + extra) / rate

    def bandwidth(span: int) -> float:
        return (hw.intra_gbs if span <= hw.gpus_per_node else hw.inter_gbs) * 1e9

    act_bytes = s // c * layout.micro_batch * h * e  # one (s, b, h) activation of this rank's tokens
    ring = 2 * (t - 1) / t
    moe_layers = sum(config.is_moe_layer(i) for i in range(L))
    per_layer = 4 - 2 * moe_layers / L  # an MoE MLP works on the sequence shards: no tp collectives of its own
    redo = 1 + twice * full / 2  # the forward's half of forward + backward, again per recomputation
    tp_volume = (L / p) * m * act_bytes * ring * per_layer * redo + 2 * m * act_bytes * ring
    routed = s // c * layout.micro_batch / (t if config.sequence_parallel else 1)  # tokens a rank routes
    if moe_layers and config.sequence_parallel:
        tp_volume += (moe_layers / p) * m * replicated_numel(config, layout.ep) * e * ring
    ep_volume = (moe_layers / p) * m * redo * dispatch_bytes(config, routed, ep=layout.ep, dtype_bytes=e)
    boundary = act_bytes / (t if config.sequence_parallel else 1)
    pp_volume = 2 * m * layout.virtual * boundary if p > 1 else 0.0
    cp_volume = (L / p) * m * (1 + twice * full) * sum(attention_send_bytes(
        layout.cp_comm_type, cp=c, batch=layout.micro_batch, seq=s, heads=config.num_attention_heads // t,
        kv_heads=config.num_query_groups // t, head_dim=config.kv_channels, dtype_bytes=e).values())
    # data parallel, on this rank's gradient shard size (padded elements): grads in fp32, params in e bytes
    elems = memory.param_bytes / e if layout.zero_stage < 3 else memory.grad_bytes / 4 * d
    experts, d_e = memory.expert_param_bytes / e, layout.expert_replicas  # reduced over the expert replicas
    ring_share = (elems - experts) * (d - 1) / d + experts * (d_e - 1) / d_e
    dp_volume = {0: 2 * 4, 1: 4 + e, 2: 4 * m + e, 3: (4 + 2 * e) * m}[layout.zero_stage] * ring_share
    backward = compute * 2 / 3  # backward is about twice the forward
    window = backward if layout.zero_stage >= 2 else backward / m
    dp = max(0.0, dp_volume / bandwidth(layout.world) - window) if d > 1 else 0.0
    shard = memory.optimizer_bytes / 12
    optimizer = shard * (4 + 4) / (hw.host_gbs * 1e9) if layout.offload_optimizer else 0.0
    return StepTime(compute_s=compute, bubble=_bubble(layout.schedule, p, m, layout.virtual, full),
                    tp_s=tp_volume / bandwidth(t) if t > 1 else 0.0, cp_s=cp_volume / bandwidth(t * c),
                    ep_s=ep_volume / bandwidth(t * c * p * layout.ep), pp_s=pp_volume / bandwidth(t * c * p), dp_s=dp,
                    optimizer_s=optimizer, model_flops=model_flops,
                    comm_bytes=tp_volume * (t > 1) + cp_volume + ep_volume + pp_volume + dp_volume * (d > 1))

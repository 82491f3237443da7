"""Parameter, gradient and optimizer bytes a rank holds, computed the way ZeroOptimizer allocates them.

No tensor is created: a GPT chunk's parameters are listed from its config (`chunk_params`, in registration
order, as models/gpt.py builds them), packed into buckets as zero/buffers.py `build_buckets` packs them
(reverse order, a new bucket at `bucket_size` elements and around each tied embedding, each padded to a
multiple of the shards), and stage 3's units are formed as zero/stage3.py `split_persistent` forms them (a
module's own parameters above the persistence threshold, padded on their own). MoE layers hold a replicated
router and this ep rank's E/ep experts (all of them at ep 1, replicated over tp); with ep > 1 the experts'
buckets are their own (a new bucket wherever the placement changes) and are sharded over the
expert-data-parallel group, dp x cp / ep ranks. The result equals `ZeroOptimizer.memory_report()` after a
step, byte for byte:

    param_bytes      every bucket's flat tensor (param dtype); stage 3: persistent buckets + the unit shards
    grad_bytes       fp32: stages 0-1 every bucket whole; stages 2-3 this rank's shard of every bucket
    optimizer_bytes  fp32 master, exp_avg, exp_avg_sq: 12 bytes per element of this rank's shard (stage 0:
                     of everything); on the host with offload_optimizer

Transient memory (stage 2/3 staging buckets in flight, stage 3's gathered units) is estimated separately.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    module: str  # the owning module's name in the chunk ("" for the GPT itself)
    name: str
    numel: int
    tied: bool = False  # a pipeline copy of the tied word embedding: bucketed alone
    expert: bool = False  # MoE experts: replicas only over the expert-data-parallel group


def chunk_params(config, tp: int, layers: tuple[int, int], pre_process: bool, post_process: bool,
                 ep: int = 1) -> list[ParamSpec]:
    """A GPT chunk's trainable parameters on one tp (and ep) rank, in nn.Module.parameters() order: the GPT's
    own (the last stage's copy of a tied embedding) first, then its submodules' as registered."""
    c, h = config, config.hidden_size
    vocab = c.padded_vocab_size(tp) // tp
    d, a, g = c.kv_channels, c.num_attention_heads, c.num_query_groups
    norm = [("weight", h)] + ([("bias", h)] if c.normalization == "LayerNorm" else [])
    fc1 = (2 if c.swiglu else 1) * c.ffn_hidden_size // tp
    modules = []  # (module, [(name, numel)], tied or "expert")
    if post_process and not pre_process and not c.untie_embeddings_and_output_weights:
        modules.append(("", [("output_weight", vocab * h)], True))
    if pre_process:
        tied = not post_process and not c.untie_embeddings_and_output_weights
        modules.append(("word_embeddings", [("weight", vocab * h)], tied))
        if c.position_embedding_type == "learned_absolute":
            modules.append(("position_embeddings", [("weight", c.max_position_embeddings * h)], False))
    bias = c.add_bias_linear
    for i in range(layers[1] - layers[0]):
        p = f"layers.{i}"
        for module, params in ((f"{p}.input_norm", norm),
                               (f"{p}.attention.qkv", [("weight", (a + 2 * g) * d // tp * h)]
                                + bias * [("bias", (a + 2 * g) * d // tp)]),
                               (f"{p}.attention.proj", [("weight", h * a * d // tp)] + bias * [("bias", h)]),
                               (f"{p}.post_attention_norm", norm)):
            modules.append((module, params, False))
        if c.is_moe_layer(layers[0] + i):
            modules += _moe_modules(c, f"{p}.mlp", ep)
        else:
            modules += [(f"{p}.mlp.fc1", [("weight", fc1 * h)] + bias * [("bias", fc1)], False),
                        (f"{p}.mlp.fc2", [("weight", h * c.ffn_hidden_size // tp)] + bias * [("bias", h)], False)]
    if post_process:
        modules.append(("final_norm", norm, False))
        if c.untie_embeddings_and_output_weights:
            modules.append(("output_layer", [("weight", vocab * h)], False))
    return [ParamSpec(m, f"{m}.{n}" if m else n, k, tied is True, tied == "expert")
            for m, params, tied in modules for n, k in params]


def _moe_modules(config, prefix: str, ep: int) -> list:
    """MoEMLP's parameters (moe/layer.py): the router (E, h), then this ep rank's E/ep experts stacked, fc1
    [gate; up] and fc2, whole on every tp rank."""
    h, moe = config.hidden_size, config.moe
    f, local = moe.ffn_size(config.ffn_hidden_size), moe.num_experts // ep
    return [(f"{prefix}.router", [("weight", moe.num_experts * h)], False),
            (f"{prefix}.experts", [("fc1", local * (2 if config.swiglu else 1) * f * h), ("fc2", local * h * f)],
             "expert")]


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def buckets_of(params: list[ParamSpec], bucket_size: int, placement) -> list[tuple[int, int, bool]]:
    """(padded size, shards, reduced over expert dp) of the buckets build_buckets makes from `params` (already
    in packing order); `placement(p)`: (shards, reduced over expert dp), a new bucket wherever it changes."""
    groups, cur, n = [], [], 0
    for p in params:
        if cur and (p.tied or cur[-1].tied or n >= bucket_size or placement(p) != placement(cur[-1])):
            groups.append((n, placement(cur[-1])))
            cur, n = [], 0
        cur.append(p)
        n += p.numel
    if cur:
        groups.append((n, placement(cur[-1])))
    return [(_pad(k, shards), shards, apart) for k, (shards, apart) in groups]


def stage3_units(chunks: list[list[ParamSpec]], threshold: int) -> tuple[list[ParamSpec], list[int]]:
    """(persistent params in registration order, unit sizes): split_persistent's split."""
    units, owned = [], set()
    for specs in chunks:
        for module in dict.fromkeys(p.module for p in specs):  # modules() order, as the params are listed
            own = [p for p in specs if p.module == module and p.numel > threshold]
            if own:
                units.append(sum(p.numel for p in own))
                owned.update(id(p) for p in own)
    return [p for specs in chunks for p in specs if id(p) not in owned], units


@dataclass(frozen=True)
class StateBytes:
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    largest_bucket: int  # elements: the staging buffer a stage 2/3 reduction fills
    unit_numels: tuple[int, ...]  # stage 3: the gathered size of each unit
    expert_numel: int = 0  # elements of the buckets reduced over the expert-data-parallel group (ep > 1)


def state_bytes(chunks: list[list[ParamSpec]], *, stage: int, dp: int, dtype_bytes: int, bucket_size: int,
                persistence_threshold: int = 0, ep: int = 1) -> StateBytes:
    """What ZeroOptimizer(chunks, stage=...) holds on one rank after a step (see the module docstring); `dp`:
    the ranks holding the same weights (dp x cp), `ep` of which hold different experts."""
    def placement(p: ParamSpec) -> tuple[int, bool]:
        apart = p.expert and ep > 1
        return (1 if stage == 0 else dp // ep if apart else dp), apart

    if stage == 3:
        whole, units = stage3_units(chunks, persistence_threshold)
        units = [_pad(u, dp) for u in units]
    else:
        whole, units = [p for specs in chunks for p in specs], []
    buckets = buckets_of(whole[::-1], bucket_size, placement)
    sizes = [n for n, _, _ in buckets]
    own = sum(n // shards for n, shards, _ in buckets) + sum(units) // dp  # this rank's slice of each
    params = sum(sizes) + sum(units) // dp
    grads = sum(sizes) if stage <= 1 else own
    return StateBytes(param_bytes=params * dtype_bytes, grad_bytes=grads * 4, optimizer_bytes=12 * own,
                      largest_bucket=max(sizes + units, default=0), unit_numels=tuple(units),
                      expert_numel=sum(n for n, _, apart in buckets if apart))

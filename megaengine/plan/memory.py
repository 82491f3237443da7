"""Parameter, gradient and optimizer bytes a rank holds, computed the way ZeroOptimizer allocates them.

No tensor is created: a GPT chunk's parameters are listed from its config (`chunk_params`, in registration
order, as models/gpt.py builds them), packed into buckets as zero/buffers.py `build_buckets` packs them
(reverse order, a new bucket at `bucket_size` elements and around each tied embedding, each padded to a
multiple of the shards), and stage 3's units are formed as zero/stage3.py `split_persistent` forms them (a
module's own parameters above the persistence threshold, padded on their own). The result equals
`ZeroOptimizer.memory_report()` after a step, byte for byte:

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


def chunk_params(config, tp: int, layers: tuple[int, int], pre_process: bool, post_process: bool) -> list[ParamSpec]:
    """A GPT chunk's trainable parameters on one tp rank, in nn.Module.parameters() order: the GPT's own
    (the last stage's copy of a tied embedding) first, then its submodules' as registered."""
    c, h = config, config.hidden_size
    vocab = c.padded_vocab_size(tp) // tp
    d, a, g = c.kv_channels, c.num_attention_heads, c.num_query_groups
    norm = [("weight", h)] + ([("bias", h)] if c.normalization == "LayerNorm" else [])
    fc1 = (2 if c.swiglu else 1) * c.ffn_hidden_size // tp
    modules = []  # (module, [(name, numel)], tied)
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
                               (f"{p}.post_attention_norm", norm),
                               (f"{p}.mlp.fc1", [("weight", fc1 * h)] + bias * [("bias", fc1)]),
                               (f"{p}.mlp.fc2", [("weight", h * c.ffn_hidden_size // tp)] + bias * [("bias", h)])):
            modules.append((module, params, False))
    if post_process:
        modules.append(("final_norm", norm, False))
        if c.untie_embeddings_and_output_weights:
            modules.append(("output_layer", [("weight", vocab * h)], False))
    return [ParamSpec(m, f"{m}.{n}" if m else n, k, tied) for m, params, tied in modules for n, k in params]


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_numels(params: list[ParamSpec], bucket_size: int, shards: int) -> list[int]:
    """Padded sizes of the buckets build_buckets makes from `params` (already in packing order)."""
    groups, cur, n = [], [], 0
    for p in params:
        if cur and (p.tied or cur[-1].tied or n >= bucket_size):
            groups.append(n)
            cur, n = [], 0
        cur.append(p)
        n += p.numel
    if cur:
        groups.append(n)
    return [_pad(k, shards) for k in groups]


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


def state_bytes(chunks: list[list[ParamSpec]], *, stage: int, dp: int, dtype_bytes: int, bucket_size: int,
                persistence_threshold: int = 0) -> StateBytes:
    """What ZeroOptimizer(chunks, stage=...) holds on one rank after a step (see the module docstring)."""
    shards = 1 if stage == 0 else dp
    if stage == 3:
        whole, units = stage3_units(chunks, persistence_threshold)
        units = [_pad(u, dp) for u in units]
    else:
        whole, units = [p for specs in chunks for p in specs], []
    buckets = bucket_numels(whole[::-1], bucket_size, shards)
    own = sum(buckets + units) // shards  # this rank's slice of every bucket and unit
    params = sum(buckets) + sum(units) // dp
    grads = sum(buckets) if stage <= 1 else own
    return StateBytes(param_bytes=params * dtype_bytes, grad_bytes=grads * 4, optimizer_bytes=12 * own,
                      largest_bucket=max(buckets + units, default=0), unit_numels=tuple(units))

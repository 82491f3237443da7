"""Enumerate the layouts of a model on N GPUs and rank those that fit by predicted step time.

Varied: tp (powers of two up to a node, dividing heads, query groups and ffn), pp (dividing the layers),
virtual stages (interleaved, 2 or 4 chunks a rank), the schedule (1f1b, zb-h1, interleaved), dp (the rest),
for MoE models ep (every divisor of dp that divides the experts; the flags' --ep is only the starting point),
ZeRO stage (0-3; 1-3 only with dp > 1; not 0 with offload; not 3 with ep > 1), the
recomputation (none, selective, full uniform 1) and the micro-batch size (1, 2, 4, 8) at the run's global
batch. Sequence parallelism is on whenever tp > 1 (Megatron's recommendation). Fixed: the model, the global
batch, the context-parallel size and comm type, the ZeRO bucket sizes, the optimizer offload setting.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from megaengine.errors import ConfigError
from megaengine.models.recompute import RecomputeConfig
from megaengine.plan.layout import Layout
from megaengine.plan.predict import Hardware, Memory, StepTime, predict_memory, step_time

RECOMPUTE = {"none": RecomputeConfig(), "selective": RecomputeConfig("selective"),
             "full": RecomputeConfig("full", "uniform", 1)}


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    recompute: str
    memory: Memory
    time: StepTime


def _tp_sizes(config, gpus_per_node: int):
    t = 1
    while t <= gpus_per_node:
        if not (config.num_attention_heads % t or config.num_query_groups % t or config.ffn_hidden_size % t
                or config.seq_length % t):
            yield t
        t *= 2


def _pipelines(layers: int, world: int, tp: int):
    for pp in range(1, layers + 1):
        if layers % pp == 0 and (world // tp) % pp == 0:
            yield from ((pp, 1, s) for s in (("1f1b", "zb-h1") if pp > 1 else ("1f1b",)))
            for v in (2, 4):
                if pp > 1 and layers % (pp * v) == 0:
                    yield pp, v, "interleaved"


def _ep_sizes(config, dp: int):
    experts = config.moe.num_experts if config.moe is not None else 1
    return [ep for ep in range(1, dp + 1) if dp % ep == 0 and experts % ep == 0]


def candidates(config, base: Layout, world: int, hw: Hardware):
    for tp in _tp_sizes(config, hw.gpus_per_node):
        if world % (tp * base.cp):
            continue
        for pp, v, schedule in _pipelines(config.num_layers, world // base.cp, tp):
            dp = world // (tp * pp * base.cp)
            for ep, mbs, stage in itertools.product(_ep_sizes(config, dp), (1, 2, 4, 8), range(4)):
                if (stage and dp * base.cp == 1) or (stage == 0 and base.offload_optimizer):
                    continue
                layout = dataclasses.replace(base, tp=tp, pp=pp, dp=dp, ep=ep, virtual=v, schedule=schedule,
                                             micro_batch=mbs, zero_stage=stage)
                for name, rc in RECOMPUTE.items():
                    cfg = dataclasses.replace(config, sequence_parallel=tp > 1, recompute=rc)
                    try:
                        layout.check(cfg)
                    except ConfigError:
                        continue
                    yield cfg, layout, name


def search(config, base: Layout, world: int, hw: Hardware) -> list[Candidate]:
    """Every layout that fits, fastest first; among equally fast ones, the least communication, then the
    least memory."""
    fits = []
    for cfg, layout, name in candidates(config, base, world, hw):
        memory = predict_memory(cfg, layout, hw)
        if memory.total_bytes <= hw.gpu_memory_gib * 2**30:
            fits.append(Candidate(layout, name, memory, step_time(cfg, layout, hw, memory)))
    return sorted(fits, key=lambda c: (round(c.time.step_s, 6), c.time.comm_bytes, c.memory.total_bytes))

"""The run a plan is for: a GPTConfig and a Layout, read from pretrain_gpt.py's flags exactly as a run resolves
them (megaengine.config: preset, flags and DeepSpeed JSON into one frozen Config), plus the planner's own."""
from __future__ import annotations

from dataclasses import dataclass

from megaengine.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1  # context parallel: ranks sharing each sequence (ZeRO shards over dp x cp)
    cp_comm_type: str = "p2p"
    ep: int = 1  # expert parallel: dp ranks holding different experts of each MoE layer
    virtual: int = 1  # model chunks per pipeline rank (interleaved schedule)
    schedule: str = "1f1b"
    zero_stage: int = 0
    bucket_size: int = 25_000_000  # elements per reduce bucket
    persistence_threshold: int = 100_000  # stage 3: parameters this small stay whole
    prefetch_size: int = 50_000_000  # stage 3: elements gathered ahead
    max_live: int = 1_000_000_000  # stage 3: most elements gathered at once
    offload_optimizer: bool = False
    micro_batch: int = 1
    global_batch: int = 1
    dtype_bytes: int = 2  # parameters and activations: 2 (bf16/fp16) or 4 (fp32)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights: gradients are reduced, and ZeRO shards, over dp x cp."""
        return self.dp * self.cp

    @property
    def expert_replicas(self) -> int:
        """Ranks holding the same experts: their gradients are reduced, and ZeRO shards, over these."""
        return self.replicas // self.ep

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def check(self, config) -> None:
        """The checks pretrain_gpt.py would make of this layout, as ConfigErrors naming the flag."""
        from megaengine.pipeline import schedules
        from megaengine.pipeline.partition import layer_ranges
        config.validate(self.tp)
        if self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(f"--global-batch-size={self.global_batch} is not divisible by --micro-batch-size x "
                              f"data-parallel size = {self.micro_batch} x {self.dp}.")
        layer_ranges(config.num_layers, self.pp, self.virtual)
        from megaengine.config import check_experts
        check_experts(config, tp=self.tp, dp=self.dp, cp=self.cp, ep=self.ep, zero_stage=self.zero_stage)
        if self.cp > 1:
            from megaengine.context_parallel import check_context_parallel
            check_context_parallel(self.cp, self.cp_comm_type, seq_length=config.seq_length, tp=self.tp,
                                   sequence_parallel=config.sequence_parallel,
                                   num_attention_heads=config.num_attention_heads,
                                   num_query_groups=config.num_query_groups, attention_dropout=config.attention_dropout,
                                   attention_backend=config.attention_backend)
        if self.pp > 1:
            schedules.check_config(self.schedule, self.pp, self.microbatches, self.virtual)


def planner_flags(parser) -> None:
    g = parser.add_argument_group("planning (python -m megaengine.plan)")
    g.add_argument("--world-size", type=int, default=None, help="GPUs in the run (default: tp x pp)")
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    g.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    g.add_argument("--search", action="store_true", help="rank the layouts that fit --world-size GPUs")
    g.add_argument("--top", type=int, default=10, help="layouts listed by --search")
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="whose kernels decide what is saved for backward (cpu: what the CPU tests measure)")
    g.add_argument("--overhead-gib", type=float, default=2.0,
                   help="per-GPU memory outside the model: CUDA context, NCCL buffers, allocator slack")
    g.add_argument("--mfu", type=float, default=0.5,
                   help="fraction of peak the model's matrix math reaches, communication and bubbles aside")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--intra-node-bandwidth", type=float, default=450.0,
                   help="GB/s one GPU sends within a node (NVLink 4: 450 each way)")
    g.add_argument("--inter-node-bandwidth", type=float, default=50.0,
                   help="GB/s one GPU sends across nodes (one 400 Gb/s NIC per GPU)")
    g.add_argument("--host-bandwidth", type=float, default=25.0,
                   help="GB/s between a GPU and host memory, for an offloaded optimizer")


def build_parser():
    """pretrain_gpt.py's flags and the planner's, for --help."""
    from megaengine.training.args import build_parser as training_parser
    parser = training_parser()
    parser.prog = "python -m megaengine.plan"
    parser.description = "Predict per-GPU memory and step time of a pretrain_gpt.py run; --search for layouts."
    planner_flags(parser)
    return parser


# Settings the plan does not depend on but pretrain_gpt.py requires: placeholders whose origin stays
# "default", so a DeepSpeed JSON's explicit value replaces them as it would replace a default.
_PLACEHOLDERS = {"lr": 1e-4, "train_iters": 1}


def parse(argv=None):
    """(Config as pretrain_gpt.py resolves it on --world-size ranks, the planner's own flags)."""
    import argparse
    import sys
    from megaengine.config import resolve_flags
    from megaengine.training.args import parse_flags
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        raise SystemExit(0)
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    planner_flags(own)
    planner, rest = own.parse_known_args(argv)
    values, origin = parse_flags(rest)
    for dest, value in _PLACEHOLDERS.items():
        if values[dest] is None:
            values[dest] = value
    tp, pp, cp = (values["tensor_model_parallel_size"], values["pipeline_model_parallel_size"],
                  values.get("context_parallel_size") or 1)
    world = planner.world_size or tp * pp * cp
    if world % (tp * pp * cp):
        raise ConfigError(f"--world-size {world} is not divisible by tp x pp x cp = {tp} x {pp} x {cp}.")
    return resolve_flags(values, origin, world), planner


def from_config(cfg):
    """(GPTConfig, Layout) from the run's resolved Config."""
    p, t, z = cfg.parallel, cfg.train, cfg.optim.zero
    layout = Layout(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, cp_comm_type=p.cp_comm_type, ep=p.ep, virtual=p.virtual_stages,
                    schedule=p.schedule, zero_stage=z.stage,
                    bucket_size=z.reduce_bucket_size, persistence_threshold=z.stage3_param_persistence_threshold,
                    prefetch_size=z.stage3_prefetch_bucket_size, max_live=z.stage3_max_live_parameters,
                    offload_optimizer=z.offload_optimizer == "cpu", micro_batch=t.micro_batch_size,
                    global_batch=t.global_batch_size, dtype_bytes=t.param_dtype.itemsize)
    layout.check(cfg.model)
    return cfg.model, layout

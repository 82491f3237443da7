"""The run a plan is for: a GPTConfig and a Layout. `from_args` is the one place that reads pretrain_gpt.py's
flags (megaengine/training/args.py), so switching to another config source touches only it."""
from __future__ import annotations

from dataclasses import dataclass

from megaengine.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
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
        return self.tp * self.pp * self.dp

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
        if self.pp > 1:
            schedules.check_config(self.schedule, self.pp, self.microbatches, self.virtual)
        if self.zero_stage == 3 and self.pp > 1:
            raise ConfigError("ZeRO stage 3 with --pipeline-model-parallel-size > 1 is not supported yet; use stage "
                              "1 or 2 with pipelines.")


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
    from megaengine.training.args import build_parser as training_parser
    parser = training_parser()
    parser.prog = "python -m megaengine.plan"
    parser.description = "Predict per-GPU memory and step time of a pretrain_gpt.py run; --search for layouts."
    planner_flags(parser)
    return parser


def parse(argv=None):
    """Flags (with a --config preset underneath, as pretrain_gpt.py reads them) -> argparse.Namespace."""
    from megaengine.training.args import load_preset
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_preset(first.config, parser))
    args = parser.parse_args(argv)
    defaults = build_parser()
    args.explicit = sorted(k for k, v in vars(args).items() if k != "config" and v != defaults.get_default(k))
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                           "global_batch_size") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"missing {', '.join('--' + k.replace('_', '-') for k in missing)}: give them as flags "
                          "or in a --config preset (e.g. configs/llama-7b.json).")
    return args


def from_args(args):
    """(GPTConfig, Layout) from parsed flags: the model, parallel sizes, batch and ZeRO settings."""
    from megaengine.training.args import load_zero_config, model_config, pipeline_schedule, virtual_stages
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world = args.world_size or tp * pp
    if world % (tp * pp):
        raise ConfigError(f"--world-size {world} is not divisible by tp x pp = {tp} x {pp}.")
    dp = world // (tp * pp)
    zero = dict(zero_stage=1 if args.use_distributed_optimizer else 0, bucket_size=args.ddp_bucket_size)
    if args.zero_config:
        args.lr = args.lr or 1e-4  # "auto" optimizer keys need a value; the plan does not depend on it
        args.train_iters = args.train_iters or 1
        z = load_zero_config(args, dp).zero_optimization
        zero = dict(zero_stage=z.stage, bucket_size=z.reduce_bucket_size,
                    persistence_threshold=z.stage3_param_persistence_threshold,
                    prefetch_size=z.stage3_prefetch_bucket_size, max_live=z.stage3_max_live_parameters,
                    offload_optimizer=z.offload_optimizer == "cpu")
    layout = Layout(tp=tp, pp=pp, dp=dp, virtual=virtual_stages(args), schedule=pipeline_schedule(args),
                    micro_batch=args.micro_batch_size, global_batch=args.global_batch_size,
                    dtype_bytes=2 if args.bf16 or args.fp16 else 4, **zero)
    config = model_config(args, args.vocab_size)
    layout.check(config)
    return config, layout

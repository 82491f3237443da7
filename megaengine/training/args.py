"""Command-line flags with Megatron-LM's names, a JSON preset underneath them, and their validation.

`parse_args(argv)` returns an argparse.Namespace. A `--config FILE.json` preset (keys are the flags' dest
names, e.g. "num_layers") sets defaults; flags given on the command line override it. Every user mistake
is a ConfigError naming the flag, the value and the fix, raised before any process group or heavy work.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os

from megaengine.parallel import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print from every rank and exit; we report once, from rank 0
        raise ConfigError(f"{message}. Run with --help for the list of flags.")


def _positive_int(flag):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {v!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {n}")
        return n
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain_gpt.py", description="Pretrain a GPT with tensor, pipeline and data parallelism.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON preset (e.g. configs/gpt-tiny.json); flags override its values")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size",
                   type=_positive_int("--tensor-model-parallel-size"), default=1)
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pipeline_model_parallel_size",
                   type=_positive_int("--pipeline-model-parallel-size"), default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int("--num-layers-per-virtual-pipeline-stage"))
    g.add_argument("--pipeline-schedule", choices=["1f1b", "interleaved", "zb-h1", "gpipe"], default=None,
                   help="default: 1f1b, or interleaved when virtual stages are set")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--zero-config", "--deepspeed-config", dest="zero_config",
                   help="DeepSpeed-style JSON (configs/zero/*.json)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Megatron's name for ZeRO stage 1")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ddp-bucket-size", type=_positive_int("--ddp-bucket-size"), default=25_000_000,
                   help="elements per gradient-reduction bucket")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=_positive_int("--num-layers"))
    g.add_argument("--hidden-size", type=_positive_int("--hidden-size"))
    g.add_argument("--ffn-hidden-size", type=_positive_int("--ffn-hidden-size"))
    g.add_argument("--num-attention-heads", type=_positive_int("--num-attention-heads"))
    g.add_argument("--num-query-groups", type=_positive_int("--num-query-groups"))
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron compatibility")
    g.add_argument("--kv-channels", type=_positive_int("--kv-channels"))
    g.add_argument("--seq-length", type=_positive_int("--seq-length"))
    g.add_argument("--max-position-embeddings", type=_positive_int("--max-position-embeddings"))
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximate GELU, as GPT-2 was trained")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=_positive_int("--make-vocab-size-divisible-by"), default=128)
    g.add_argument("--attention-backend", choices=["auto", "triton", "sdpa", "torch"], default="auto")
    g.add_argument("--normalization-backend", choices=["auto", "triton", "cuda", "torch"], default="auto")

    g = p.add_argument_group("activation recomputation (Megatron's flags)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="selective: the attention core of every layer; full: whole layers (see --recompute-method)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: uniform recomputes groups of --recompute-num-layers layers, keeping each group's "
                        "input; block recomputes the first --recompute-num-layers layers of each pipeline chunk")
    g.add_argument("--recompute-num-layers", type=_positive_int("--recompute-num-layers"), default=None)
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=_positive_int("--micro-batch-size"))
    g.add_argument("--global-batch-size", type=_positive_int("--global-batch-size"))
    g.add_argument("--train-iters", type=_positive_int("--train-iters"))
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip; 0 disables")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--exit-interval", type=_positive_int("--exit-interval"), help="stop after this iteration")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted: 0.7 a 0.3 b; none: the embedded corpus")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-model", help="sentencepiece model (required with --data-path)")
    g.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=4096,
                   help="vocabulary of the tokenizer trained for the embedded corpus")
    g.add_argument("--data-cache-dir", help="where the embedded corpus is built (default ~/.cache/megaengine)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=_positive_int("--save-interval"))
    g.add_argument("--save-retain", type=_positive_int("--save-retain"), help="keep only the newest N checkpoints")
    g.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    g.add_argument("--load-hf", help="start from a Hugging Face GPT-2 or LLaMA checkpoint directory")

    g = p.add_argument_group("fault tolerance")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. SLURM preemption) save a checkpoint and exit cleanly")
    g.add_argument("--max-skipped-steps", type=_positive_int("--max-skipped-steps"), default=10,
                   help="stop after this many consecutive steps skipped for inf/nan gradients")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=_positive_int("--log-interval"), default=10)
    g.add_argument("--eval-interval", type=_positive_int("--eval-interval"), default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--metrics-file", help="JSON lines; default <save>/metrics.jsonl when saving")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--peak-tflops", type=float, help="per-device peak for MFU when the device is not in our table")
    g.add_argument("--sample-tokens", type=int, default=48, help="tokens of text sampled at the end; 0: none")
    return p


REQUIRED = ["num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
            "global_batch_size", "train_iters", "lr"]


def load_preset(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file.")
    try:
        with open(path) as f:
            preset = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}.") from None
    known = {a.dest for a in parser._actions}
    for key in preset:
        if key.startswith("_"):
            continue  # comments and notes
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}.{hint}")
    return {k: v for k, v in preset.items() if not k.startswith("_")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_preset(first.config, parser))
    args = parser.parse_args(argv)
    # Values the user chose (flags or preset), as opposed to our defaults: a DeepSpeed JSON must agree with
    # these, while its "auto" keys take any value.
    defaults = build_parser()
    args.explicit = sorted(k for k, v in vars(args).items() if k != "config" and v != defaults.get_default(k))
    missing = [k for k in REQUIRED if getattr(args, k) is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ConfigError(f"missing {flags}: give them as flags or in a --config preset (e.g. configs/gpt-tiny.json).")
    return args


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Checks that need only the flags and the world size: run on every rank before any collective."""
    from megaengine.parallel import check_layout
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = check_layout(world_size, tp, pp, None)
    micro, glob = args.micro_batch_size, args.global_batch_size
    if glob % (micro * dp):
        raise ConfigError(
            f"--global-batch-size={glob} is not divisible by --micro-batch-size x data-parallel size = "
            f"{micro} x {dp} = {micro * dp}. Use a multiple of {micro * dp}.")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are both set; choose one.")
    if args.lr <= 0:
        raise ConfigError(f"--lr={args.lr} must be > 0.")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr={args.min_lr} is above --lr={args.lr}.")
    if args.data_path and not args.tokenizer_model:
        raise ConfigError("--data-path needs --tokenizer-model (the sentencepiece model the data was encoded with).")
    if args.tokenizer_model and not os.path.exists(args.tokenizer_model):
        raise ConfigError(f"--tokenizer-model {args.tokenizer_model}: no such file.")
    if args.load and not _has_checkpoint(args.load) and args.load != args.save:
        raise ConfigError(f"--load {args.load}: no checkpoint there (no latest_checkpointed_iteration.txt). "
                          "Check the path, or drop --load to start from scratch.")
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')}={v} must be in [0, 1).")
    model_config(args, vocab_size=1).validate(tp)
    if pp > 1 or args.num_layers_per_virtual_pipeline_stage:
        from megaengine.pipeline import schedules
        from megaengine.pipeline.partition import layer_ranges
        v = virtual_stages(args)
        layer_ranges(args.num_layers, pp, v)
        if pp > 1:  # the schedule itself checks micro-batches against stages
            schedules.build(pipeline_schedule(args), pp, glob // (micro * dp), v)
    if args.zero_config:
        load_zero_config(args, dp)


def virtual_stages(args) -> int:
    """Model chunks per pipeline rank: num_layers / (pp x --num-layers-per-virtual-pipeline-stage), else 1."""
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if not per_stage:
        return 1
    pp = args.pipeline_model_parallel_size
    v, rest = divmod(args.num_layers, pp * per_stage)
    if rest or v < 1:
        raise ConfigError(f"--num-layers={args.num_layers} is not divisible by --pipeline-model-parallel-size x "
                          f"--num-layers-per-virtual-pipeline-stage = {pp} x {per_stage} = {pp * per_stage}.")
    return v


def pipeline_schedule(args) -> str:
    """--pipeline-schedule, defaulting to 1f1b, or interleaved when virtual stages are set (Megatron's rule)."""
    v = virtual_stages(args)
    name = args.pipeline_schedule or ("interleaved" if v > 1 else "1f1b")
    if v > 1 and name != "interleaved":
        raise ConfigError(f"--num-layers-per-virtual-pipeline-stage makes {v} virtual stages, which needs "
                          f"--pipeline-schedule interleaved (got {name}).")
    return name


def cli_for_zero_config(args, dp: int, auto_sources: set) -> dict:
    """Flag values a DeepSpeed JSON is resolved against: those the user set, and those its "auto" keys need."""
    values = {"global_batch_size": args.global_batch_size, "micro_batch_size": args.micro_batch_size,
              "gradient_accumulation_steps": args.global_batch_size // (args.micro_batch_size * dp),
              "clip_grad": args.clip_grad, "lr": args.lr, "min_lr": args.min_lr, "adam_eps": args.adam_eps,
              "weight_decay": args.weight_decay, "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
              "warmup_steps": args.lr_warmup_iters, "train_iters": args.train_iters, "fp16": args.fp16,
              "bf16": args.bf16, "hidden_size": args.hidden_size}
    always = {"global_batch_size", "micro_batch_size", "gradient_accumulation_steps", "hidden_size"}
    chosen = always | set(args.explicit) | auto_sources
    if "warmup_steps" not in chosen and "lr_warmup_iters" in args.explicit:
        chosen.add("warmup_steps")
    cli = {k: v for k, v in values.items() if k in chosen}
    cli["dp_size"] = dp
    return cli


def load_zero_config(args, dp: int):
    """Read --zero-config against the flags; the result is kept as args.zero (a DeepSpeedConfig)."""
    from megaengine.zero.config import AUTO_SOURCES, _auto_paths, _read, load_config
    data, _ = _read(args.zero_config)
    sources = set()
    for path in _auto_paths(data):
        src = AUTO_SOURCES.get(path, ())
        sources.update((src,) if isinstance(src, str) else src)
    sources = {s for s in sources if s}
    cfg = load_config(args.zero_config, cli=cli_for_zero_config(args, dp, sources))
    if args.use_distributed_optimizer and cfg.zero_optimization.stage == 0:
        raise ConfigError(f"--use-distributed-optimizer asks for ZeRO stage 1 but --zero-config {args.zero_config} "
                          "has zero_optimization.stage 0; drop one of them.")
    if cfg.zero_optimization.stage == 3 and args.pipeline_model_parallel_size > 1:
        raise ConfigError(f"--zero-config {args.zero_config}: ZeRO stage 3 with --pipeline-model-parallel-size "
                          f"{args.pipeline_model_parallel_size} is not supported; use stage 1 or 2 with pipelines.")
    args.bf16, args.fp16 = cfg.bf16, cfg.fp16.enabled
    args.zero = cfg
    return cfg


def _has_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, "latest_checkpointed_iteration.txt"))


def model_config(args: argparse.Namespace, vocab_size: int):
    from megaengine.models import GPTConfig
    return GPTConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=args.seq_length, max_position_embeddings=args.max_position_embeddings,
        vocab_size=vocab_size, ffn_hidden_size=args.ffn_hidden_size, kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups, position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, normalization=args.normalization, norm_epsilon=args.norm_epsilon,
        swiglu=args.swiglu, gelu_approximate="tanh" if args.openai_gelu else "none", add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, init_method_std=args.init_method_std,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        attention_backend=args.attention_backend, normalization_backend=args.normalization_backend,
        init_seed=args.seed, recompute_granularity=recompute_granularity(args),
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)


def recompute_granularity(args) -> str | None:
    """--recompute-granularity, or selective for Megatron's --recompute-activations."""
    if args.recompute_activations and args.recompute_granularity not in (None, "selective"):
        raise ConfigError(f"--recompute-activations means --recompute-granularity selective, but "
                          f"--recompute-granularity is {args.recompute_granularity}; drop one of them.")
    return args.recompute_granularity or ("selective" if args.recompute_activations else None)

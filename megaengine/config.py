"""The run's configuration, resolved once at the edge: pretrain_gpt.py's flags, a `--config` preset and a
DeepSpeed JSON become one frozen `Config` (a dataclass per concern), checked before any heavy work, printed
at start and saved in every checkpoint. Nothing below pretrain_gpt.py reads flags.

One rule where two sources give one setting: a flag beats the preset, both beat a default. A DeepSpeed JSON
key that the file leaves out (or sets to "auto") takes the flags' value; an explicit JSON value must agree
with a value the user set (flag or preset), else the run stops showing both; it replaces a default nobody set.
`Config.sources` says, for every flag, where its value came from.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from megaengine.checkpoint import latest_tag
from megaengine.context_parallel.validate import check_context_parallel
from megaengine.data import Tokenizer
from megaengine.data.dataset import parse_data_path
from megaengine.data.indexed import check_prefix
from megaengine.errors import ConfigError
from megaengine.fp8.config import FP8Config, check_fp8_run
from megaengine.models.gpt import GPTConfig
from megaengine.models.recompute import RecomputeConfig
from megaengine.moe.config import MoEConfig, check_moe
from megaengine.parallel.mesh import check_layout
from megaengine.pipeline import schedules
from megaengine.pipeline.partition import layer_ranges
from megaengine.tools.hf_tokenizer import hf_tokenizer_model
from megaengine.training.args import flag_name, parse_flags
from megaengine.zero.config import FP16Config, OptimConfig, ZeroConfig, load_config

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
            "global_batch_size", "train_iters", "lr")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_FORMATS = {"e4m3": "e4m3 forward and backward", "hybrid": "e4m3 forward, e5m2 gradients"}


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_stages: int = 1  # model chunks per pipeline rank
    schedule: str = "1f1b"  # the pipeline schedule (pipeline.schedules), used when pp > 1
    sequence_parallel: bool = False
    ep: int = 1  # expert-parallel size, carved out of dp
    cp: int = 1  # context parallel: ranks sharing each sequence
    cp_comm_type: str = "p2p"  # "p2p" (ring attention) or "a2a" (all-to-all, Ulysses)
    backend: str | None = None  # None: nccl with CUDA, else gloo
    timeout_minutes: float = 10.0


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    seed: int = 1234
    precision: str = "fp32"  # "fp32", "bf16" or "fp16": the parameters' dtype (masters are always fp32)
    exit_interval: int | None = None
    exit_signal_handler: bool = False
    max_skipped_steps: int = 10

    @property
    def param_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def micro_batches(self, dp: int) -> int:
        """Micro-batches per rank per step (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * dp)


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple | None = None  # Megatron's [weight] prefix list; None: the embedded corpus
    split: str = "969,30,1"
    tokenizer_model: str | None = None
    vocab_size: int = 4096  # of the tokenizer built for the embedded corpus
    cache_dir: str | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    save_retain: int | None = None
    async_save: bool = False
    load_hf: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    metrics_file: str | None = None
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None
    sample_tokens: int = 48


@dataclass(frozen=True)
class Config:
    model: GPTConfig
    parallel: ParallelConfig
    optim: OptimConfig
    train: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    zero_config: str | None = None  # the DeepSpeed JSON the optimizer settings were resolved with
    sources: dict = field(default_factory=dict)  # flag dest -> "flag", "preset", "json" or "default"
    json_keys: tuple = ()  # the keys that JSON gave a value ("auto" and left-out keys took the flags')

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What runs, and where each chosen value came from: printed once by rank 0 at start."""
        def v(dest, value):
            origin = self.sources.get(dest, "default")
            return f"{value} [{origin}]" if origin != "default" else f"{value}"
        p, t, o, m = self.parallel, self.train, self.optim, self.model
        sched = (f"DeepSpeed {o.scheduler.type} [json]" if o.scheduler.type else
                 f"{v('lr_decay_style', o.lr_decay_style)} to min lr {v('min_lr', o.min_lr)}, warmup "
                 f"{v('lr_warmup_iters', o.lr_warmup_iters)}, decay over {o.lr_decay_iters}")
        lines = [
            "megaengine configuration ([flag], [preset] or [json]: where a value came from; unmarked: default)",
            f"  layout     tp {v('tensor_model_parallel_size', p.tp)} x pp {v('pipeline_model_parallel_size', p.pp)}"
            + (f" x cp {v('context_parallel_size', p.cp)}" if p.cp > 1 else "")
            + f" x dp {p.dp}" + (f" (ep {v('expert_model_parallel_size', p.ep)})" if p.ep > 1 else "")
            + (f" | pipeline schedule {p.schedule}, {p.virtual_stages} virtual stage(s)" if p.pp > 1
                                else "") + (" | sequence parallel" if p.sequence_parallel else "")
            + (f" | context parallel {v('cp_comm_type', p.cp_comm_type)}, {m.seq_length // p.cp} tokens per rank, "
               f"attention dropout {m.attention_dropout}" if p.cp > 1 else ""),
            f"  model      {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads "
            f"({m.num_query_groups} kv), ffn {m.ffn_hidden_size}, seq {m.seq_length}, vocab {m.vocab_size}, "
            f"{m.position_embedding_type}, {m.normalization}{', SwiGLU' if m.swiglu else ''}"
            + (f", recompute {m.recompute.describe()}" if m.recompute.granularity else ""),
            *([_moe_summary(m.moe, v)] if m.moe else []),
            f"  batch      global {v('global_batch_size', t.global_batch_size)} = micro "
            f"{v('micro_batch_size', t.micro_batch_size)} x {t.micro_batches(p.dp)} accumulation x dp {p.dp}; "
            f"{v('train_iters', t.train_iters)} iterations",
            f"  optimizer  {'AdamW' if o.adam_w_mode else 'Adam (L2)'} lr {v('lr', o.lr)}, betas "
            f"({v('adam_beta1', o.betas[0])}, {v('adam_beta2', o.betas[1])}), eps {v('adam_eps', o.eps)}, weight "
            f"decay {v('weight_decay', o.weight_decay)}, clip grad {v('clip_grad', o.clip_grad)}; ZeRO stage "
            f"{o.zero.stage}" + (" [json]" if "zero_optimization.stage" in self.json_keys else "") +
            (", optimizer offloaded to CPU" if o.zero.offload_optimizer == "cpu" else ""),
            f"  schedule   {sched}",
            f"  precision  {v(t.precision, t.precision) if t.precision != 'fp32' else 'fp32'}, seed {v('seed', t.seed)}",
        ]
        if m.fp8 is not None:
            f = m.fp8
            history = (f", amax history {v('fp8_amax_history_len', f.amax_history_len)} steps, "
                       f"{v('fp8_amax_compute_algo', f.amax_compute_algo)}" if f.recipe == "delayed" else "")
            lines.append(f"  fp8        {v('fp8_format', f.format)} ({FP8_FORMATS[f.format]}) in the transformer layers' "
                         f"linears, {v('fp8_recipe', f.recipe)} scaling{history}"
                         + (f", margin {v('fp8_margin', f.margin)}" if f.margin else ""))
        if self.zero_config:
            lines.append(f"  DeepSpeed  {self.zero_config}: keys it leaves out took the flags' values")
        return "\n".join(lines)


def _moe_summary(moe: MoEConfig, v) -> str:
    capacity = ("dropless" if moe.moe_expert_capacity_factor is None else
                f"capacity factor {v('moe_expert_capacity_factor', moe.moe_expert_capacity_factor)} "
                f"({moe.moe_token_drop_policy})")
    return (f"  moe        {v('num_experts', moe.num_experts)} experts, "
            f"top {v('moe_router_topk', moe.moe_router_topk)}, "
            f"expert ffn {moe.moe_ffn_hidden_size or 'as dense'}, every {moe.moe_layer_freq} layer(s), "
            f"{moe.moe_token_dispatcher_type}, {capacity}, aux loss "
            f"{v('moe_aux_loss_coeff', moe.moe_aux_loss_coeff)}, z loss {v('moe_z_loss_coeff', moe.moe_z_loss_coeff)}")


# ---- resolution -------------------------------------------------------------------------------------------

def resolve(argv=None, world_size: int = 1) -> Config:
    """Flags (+ preset + DeepSpeed JSON) -> Config, or a ConfigError naming the flag, its value and the fix.
    Needs only the flags, the files they name and the world size: every rank reaches the same verdict."""
    return resolve_flags(*parse_flags(argv), world_size)


def resolve_flags(values: dict, origin: dict, world_size: int = 1) -> Config:
    """`resolve` from parsed flags (args.parse_flags): for tools that read pretrain_gpt.py's flags next to
    their own (python -m megaengine.plan)."""
    values, origin = dict(values), dict(origin)
    _check_data_files(values)
    _require(values, [k for k in REQUIRED if not (values["zero_config"] and k in _SHARED)])
    tp, pp = values["tensor_model_parallel_size"], values["pipeline_model_parallel_size"]
    dp = check_layout(world_size, tp, pp, None, values["context_parallel_size"])
    ds = _merge_deepspeed(values, origin, dp) if values["zero_config"] else None
    _require(values, REQUIRED)
    parallel = _parallel(values, dp)
    train = _training(values, dp)
    optim = _optim(values, ds)
    data = _data(values, origin)
    _context_parallel_defaults(values, origin, parallel)
    model = _model(values, data, parallel, _fp8(values, origin))
    check_experts(model, tp=parallel.tp, dp=parallel.dp, cp=parallel.cp, ep=parallel.ep, zero_stage=optim.zero.stage)
    check_context_parallel(parallel.cp, parallel.cp_comm_type, seq_length=model.seq_length, tp=parallel.tp,
                           sequence_parallel=model.sequence_parallel, num_attention_heads=model.num_attention_heads,
                           num_query_groups=model.num_query_groups, attention_dropout=model.attention_dropout,
                           attention_backend=model.attention_backend)
    checkpoint = _checkpoint(values)
    logging = LoggingConfig(
        log_interval=values["log_interval"], eval_interval=values["eval_interval"], eval_iters=values["eval_iters"],
        metrics_file=values["metrics_file"] or (os.path.join(checkpoint.save, "metrics.jsonl")
                                                if checkpoint.save else None),
        tensorboard_dir=values["tensorboard_dir"], peak_tflops=values["peak_tflops"],
        sample_tokens=values["sample_tokens"])
    return Config(model=model, parallel=parallel, optim=optim, train=train, data=data, checkpoint=checkpoint,
                  logging=logging, zero_config=values["zero_config"], sources=dict(origin),
                  json_keys=tuple(sorted(ds.explicit)) if ds is not None else ())


def _require(values: dict, names) -> None:
    missing = [k for k in names if values[k] is None]
    if missing:
        raise ConfigError(f"missing {', '.join(map(flag_name, missing))}: give them as flags or in a --config preset "
                          "(e.g. configs/gpt-tiny.json).")


def _check_data_files(values: dict) -> None:
    """The data named comes first: a missing file is the real problem, whatever else is missing."""
    if not values["data_path"]:
        return
    for _, prefix in parse_data_path(values["data_path"]):
        check_prefix(prefix)
    if not values["tokenizer_model"] and not values["load_hf"]:
        raise ConfigError("--data-path needs --tokenizer-model (the sentencepiece model the data was encoded with).")


# flag dest -> (FLAG_KEYS name in zero.config, the JSON key): the settings a DeepSpeed JSON shares with flags.
_SHARED = {
    "global_batch_size": ("global_batch_size", "train_batch_size"),
    "micro_batch_size": ("micro_batch_size", "train_micro_batch_size_per_gpu"),
    "clip_grad": ("clip_grad", "gradient_clipping"),
    "lr": ("lr", "optimizer.params.lr"),
    "adam_eps": ("adam_eps", "optimizer.params.eps"),
    "weight_decay": ("weight_decay", "optimizer.params.weight_decay"),
    "adam_beta1": ("adam_beta1", "optimizer.params.betas"),
    "adam_beta2": ("adam_beta2", "optimizer.params.betas"),
    "min_lr": ("min_lr", "scheduler.params.warmup_min_lr"),
    "lr_warmup_iters": ("warmup_steps", "scheduler.params.warmup_num_steps"),
    "train_iters": ("train_iters", "scheduler.params.total_num_steps"),
    "bf16": ("bf16", "bf16.enabled"),
    "fp16": ("fp16", "fp16.enabled"),
    "ddp_bucket_size": ("reduce_bucket_size", "zero_optimization.reduce_bucket_size"),
    "overlap_grad_reduce": ("overlap_comm", "zero_optimization.overlap_comm"),
}
_MEGATRON_SCHEDULE = ("lr_decay_style", "lr_decay_iters")


def _merge_deepspeed(values: dict, origin: dict, dp: int):
    """Read --zero-config against the flags and write its values back into `values` (and `origin`)."""
    path = values["zero_config"]
    cli = {name: values[dest] for dest, (name, _) in _SHARED.items()}
    cli.update(zero_stage=1 if values["use_distributed_optimizer"] else 0, hidden_size=values["hidden_size"],
               dp_size=dp)
    if values["global_batch_size"] and values["micro_batch_size"]:
        cli["gradient_accumulation_steps"] = values["global_batch_size"] // (values["micro_batch_size"] * dp)
    user_set = {name for dest, (name, _) in _SHARED.items() if origin[dest] != "default"}
    if {"global_batch_size", "micro_batch_size"} <= user_set:
        user_set.add("gradient_accumulation_steps")
    ds = load_config(path, cli=cli, user_set=user_set)
    if values["use_distributed_optimizer"] and ds.zero_optimization.stage == 0:
        raise ConfigError(f"--use-distributed-optimizer asks for ZeRO stage 1 but --zero-config {path} has "
                          "zero_optimization.stage 0; drop one of them.")
    if ds.scheduler.type:
        clash = [d for d in _MEGATRON_SCHEDULE if origin[d] != "default"]
        if clash:
            raise ConfigError(f"--zero-config {path} has a scheduler ({ds.scheduler.type}) and "
                              f"{flag_name(clash[0])} {values[clash[0]]} ({origin[clash[0]]}) sets Megatron's; "
                              "keep one schedule: drop the JSON's \"scheduler\" or the flag.")
    z = ds.zero_optimization
    resolved = {"global_batch_size": ds.train_batch_size, "micro_batch_size": ds.train_micro_batch_size_per_gpu,
                "clip_grad": ds.gradient_clipping, "lr": ds.optimizer.lr, "adam_eps": ds.optimizer.eps,
                "weight_decay": ds.optimizer.weight_decay, "adam_beta1": ds.optimizer.betas[0],
                "adam_beta2": ds.optimizer.betas[1], "bf16": ds.bf16, "fp16": ds.fp16.enabled,
                "ddp_bucket_size": z.reduce_bucket_size, "overlap_grad_reduce": z.overlap_comm}
    for dest, value in resolved.items():
        if _SHARED[dest][1] in ds.explicit:
            origin[dest] = "json"
        values[dest] = value
    return ds


def _parallel(values: dict, dp: int) -> ParallelConfig:
    tp, pp, layers = values["tensor_model_parallel_size"], values["pipeline_model_parallel_size"], values["num_layers"]
    per_stage, v = values["num_layers_per_virtual_pipeline_stage"], 1
    if per_stage:
        v, rest = divmod(layers, pp * per_stage)
        if rest or v < 1:
            raise ConfigError(f"--num-layers={layers} is not divisible by --pipeline-model-parallel-size x "
                              f"--num-layers-per-virtual-pipeline-stage = {pp} x {per_stage} = {pp * per_stage}.")
    schedule = values["pipeline_schedule"] or ("interleaved" if v > 1 else "1f1b")
    if v > 1 and schedule != "interleaved":
        raise ConfigError(f"--num-layers-per-virtual-pipeline-stage makes {v} virtual stages, which needs "
                          f"--pipeline-schedule interleaved (got {schedule}).")
    if pp > 1 or per_stage:
        layer_ranges(layers, pp, v)
    glob, micro = values["global_batch_size"], values["micro_batch_size"]
    if glob % (micro * dp):
        raise ConfigError(
            f"--global-batch-size={glob} is not divisible by --micro-batch-size x data-parallel size = "
            f"{micro} x {dp} = {micro * dp}. Use a multiple of {micro * dp}.")
    if pp > 1:  # the schedule itself checks micro-batches against stages
        schedules.build(schedule, pp, glob // (micro * dp), v)
    return ParallelConfig(tp=tp, pp=pp, dp=dp, virtual_stages=v, schedule=schedule,
                          sequence_parallel=values["sequence_parallel"] and tp > 1,
                          ep=values["expert_model_parallel_size"],
                          cp=values["context_parallel_size"], cp_comm_type=values["cp_comm_type"],
                          backend=values["distributed_backend"], timeout_minutes=values["distributed_timeout_minutes"])


def _context_parallel_defaults(values: dict, origin: dict, parallel: ParallelConfig) -> None:
    """Context-parallel attention has no dropout: with --cp > 1 the default attention dropout (0.1) becomes 0; a
    value the user chose is checked (and refused) by check_context_parallel."""
    if parallel.cp > 1 and origin["attention_dropout"] == "default":
        values["attention_dropout"] = 0.0


def _training(values: dict, dp: int) -> TrainingConfig:
    if values["bf16"] and values["fp16"]:
        raise ConfigError("--bf16 and --fp16 are both set; choose one.")
    precision = "bf16" if values["bf16"] else "fp16" if values["fp16"] else "fp32"
    return TrainingConfig(
        micro_batch_size=values["micro_batch_size"], global_batch_size=values["global_batch_size"],
        train_iters=values["train_iters"], seed=values["seed"], precision=precision,
        exit_interval=values["exit_interval"], exit_signal_handler=values["exit_signal_handler"],
        max_skipped_steps=values["max_skipped_steps"])


def _optim(values: dict, ds) -> OptimConfig:
    if values["lr"] <= 0:
        raise ConfigError(f"--lr={values['lr']} must be > 0.")
    if values["min_lr"] > values["lr"]:
        raise ConfigError(f"--min-lr={values['min_lr']} is above --lr={values['lr']}.")
    schedule = dict(min_lr=values["min_lr"], lr_decay_style=values["lr_decay_style"],
                    lr_warmup_iters=values["lr_warmup_iters"],
                    lr_decay_iters=values["lr_decay_iters"] or values["train_iters"])
    if ds is not None:
        return OptimConfig.from_deepspeed(ds, **schedule)
    return OptimConfig(
        lr=values["lr"], weight_decay=values["weight_decay"], betas=(values["adam_beta1"], values["adam_beta2"]),
        eps=values["adam_eps"], clip_grad=values["clip_grad"],
        zero=ZeroConfig(stage=1 if values["use_distributed_optimizer"] else 0,
                        reduce_bucket_size=values["ddp_bucket_size"], overlap_comm=values["overlap_grad_reduce"]),
        fp16=FP16Config(enabled=values["fp16"]), **schedule)


def _data(values: dict, origin: dict) -> DataConfig:
    tokenizer, hf_dir = values["tokenizer_model"], values["load_hf"]
    if tokenizer and not os.path.exists(tokenizer):
        raise ConfigError(f"--tokenizer-model {tokenizer}: no such file.")
    if hf_dir and values["data_path"]:  # the Hugging Face directory's tokenizer is the default, and must agree
        theirs = os.path.join(hf_dir, "tokenizer.model")
        if not tokenizer:
            tokenizer = hf_tokenizer_model(hf_dir)
        elif os.path.isfile(theirs) and not same_file(tokenizer, theirs):
            raise ConfigError(f"--tokenizer-model {tokenizer} is not the tokenizer of --load-hf {hf_dir} ({theirs}); "
                              "train on data encoded with the model's own tokenizer, or drop --tokenizer-model.")
    if tokenizer and origin["vocab_size"] == "flag":
        raise ConfigError(f"--vocab-size {values['vocab_size']} sizes the tokenizer built for the embedded corpus, "
                          f"but --tokenizer-model {tokenizer} brings its own vocabulary; drop --vocab-size.")
    data_path = tuple(values["data_path"]) if values["data_path"] else None
    return DataConfig(data_path=data_path, split=values["split"], tokenizer_model=tokenizer,
                      vocab_size=values["vocab_size"], cache_dir=values["data_cache_dir"])


def same_file(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def tokenizer_vocab_size(data: DataConfig) -> int:
    """The vocabulary the model is built for: the given tokenizer's, else the embedded corpus's."""
    if data.tokenizer_model:
        return Tokenizer(data.tokenizer_model).vocab_size
    return data.vocab_size


def _model(values: dict, data: DataConfig, parallel: ParallelConfig, fp8: FP8Config | None) -> GPTConfig:
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= values[name] < 1.0:
            raise ConfigError(f"{flag_name(name)}={values[name]} must be in [0, 1).")
    config = GPTConfig(
        num_layers=values["num_layers"], hidden_size=values["hidden_size"],
        num_attention_heads=values["num_attention_heads"], seq_length=values["seq_length"],
        max_position_embeddings=values["max_position_embeddings"], vocab_size=tokenizer_vocab_size(data),
        ffn_hidden_size=values["ffn_hidden_size"], kv_channels=values["kv_channels"],
        num_query_groups=values["num_query_groups"], position_embedding_type=values["position_embedding_type"],
        rotary_base=values["rotary_base"], normalization=values["normalization"], norm_epsilon=values["norm_epsilon"],
        swiglu=values["swiglu"], gelu_approximate="tanh" if values["openai_gelu"] else "none",
        add_bias_linear=not values["disable_bias_linear"],
        untie_embeddings_and_output_weights=values["untie_embeddings_and_output_weights"],
        hidden_dropout=values["hidden_dropout"], attention_dropout=values["attention_dropout"],
        make_vocab_size_divisible_by=values["make_vocab_size_divisible_by"],
        init_method_std=values["init_method_std"], sequence_parallel=parallel.sequence_parallel,
        attention_backend=values["attention_backend"], normalization_backend=values["normalization_backend"],
        init_seed=values["seed"], fp8=fp8, moe=MoEConfig.from_dict(values), recompute=_recompute(values))
    config.validate(parallel.tp)
    if fp8 is not None and _device(values).type == "cuda":
        _check_fp8_shapes(config, parallel, values["micro_batch_size"])
    return config


def _recompute(values: dict) -> RecomputeConfig:
    """--recompute-granularity, or selective for Megatron's --recompute-activations."""
    granularity = values["recompute_granularity"]
    if values["recompute_activations"] and granularity not in (None, "selective"):
        raise ConfigError(f"--recompute-activations means --recompute-granularity selective, but "
                          f"--recompute-granularity is {granularity}; drop one of them.")
    return RecomputeConfig(granularity=granularity or ("selective" if values["recompute_activations"] else None),
                           method=values["recompute_method"], num_layers=values["recompute_num_layers"])


def check_experts(model: GPTConfig, *, tp: int, dp: int, cp: int, ep: int, zero_stage: int) -> None:
    """Expert parallelism against the layout: experts over ep, ep out of dp; ZeRO stages 0-2 only. Also what
    the planner checks of each layout it considers."""
    check_moe(model.moe, num_layers=model.num_layers, ep=ep, dp=dp, tp=tp, sequence_parallel=model.sequence_parallel,
              add_bias_linear=model.add_bias_linear)
    if model.moe is not None and cp > 1:
        raise ConfigError(f"--num-experts with --context-parallel-size {cp} is not supported yet: the router's "
                          "load-balancing statistics would need summing over the cp ranks' sequence chunks; use cp 1.")
    if ep > 1 and zero_stage == 3:
        raise ConfigError(f"ZeRO stage 3 with --expert-model-parallel-size {ep} is not supported (expert "
                          "parameters are sharded over their own expert-data-parallel group); use stage 1 or 2.")


_FP8_SETTINGS = ("fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin")


def _fp8(values: dict, origin: dict) -> FP8Config | None:
    """--fp8-format turns FP8 on; it needs --bf16, refuses --fp16 and a GPU without FP8 tensor cores."""
    if values["fp8_format"] is None:
        stray = [d for d in _FP8_SETTINGS if origin[d] != "default"]
        if stray:
            raise ConfigError(f"{flag_name(stray[0])}={values[stray[0]]} ({origin[stray[0]]}) sets FP8 scaling but FP8 "
                              "is off; add --fp8-format hybrid (or e4m3) to train in FP8, or drop it.")
        return None
    config = FP8Config(format=values["fp8_format"], recipe=values["fp8_recipe"],
                       amax_history_len=values["fp8_amax_history_len"],
                       amax_compute_algo=values["fp8_amax_compute_algo"], margin=values["fp8_margin"])
    check_fp8_run(config, bf16=values["bf16"], fp16=values["fp16"], device=_device(values))
    return config


def _device(values: dict) -> torch.device:
    """The device this rank will train on (parallel.initialize picks it the same way: cuda:LOCAL_RANK with nccl)."""
    backend = values["distributed_backend"] or ("nccl" if torch.cuda.is_available() else "gloo")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")


def _check_fp8_shapes(m: GPTConfig, parallel: ParallelConfig, micro_batch: int) -> None:
    """torch._scaled_mm on CUDA needs each FP8 matmul's sizes (tokens, inputs, outputs per rank) to be multiples
    of 16; say which flag breaks it rather than fail inside the first step."""
    d, tp = m.kv_channels, parallel.tp
    sizes = [("--hidden-size", m.hidden_size),
             ("--seq-length / cp x --micro-batch-size (tokens per micro-batch and rank)",
              m.seq_length // parallel.cp * micro_batch),
             ("--num-attention-heads x --kv-channels / tp", m.num_attention_heads * d // tp),
             ("(--num-attention-heads + 2 x --num-query-groups) x --kv-channels / tp",
              (m.num_attention_heads + 2 * m.num_query_groups) * d // tp),
             ("--ffn-hidden-size / tp", m.ffn_hidden_size // tp)]
    for what, n in sizes:
        if n % 16:
            raise ConfigError(f"--fp8-format {m.fp8.format} on CUDA: {what} = {n} is not a multiple of 16, which FP8 "
                              "matmuls (torch._scaled_mm) need; choose sizes that are, or drop --fp8-format.")


def _checkpoint(values: dict) -> CheckpointConfig:
    load, save = values["load"], values["save"]
    if load and latest_tag(load) is None and load != save:
        raise ConfigError(f"--load {load}: no checkpoint there (no latest_checkpointed_iteration.txt). "
                          "Check the path, or drop --load to start from scratch.")
    return CheckpointConfig(save=save, load=load, save_interval=values["save_interval"],
                            save_retain=values["save_retain"], async_save=values["async_save"],
                            load_hf=values["load_hf"])

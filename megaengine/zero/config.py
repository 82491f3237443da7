"""DeepSpeed-style JSON configs -> validated dataclasses (`load_config`), and `OptimConfig`, what the optimizer
does once flags and JSON are resolved.

Keys keep DeepSpeed's names, defaults and meaning (deepspeed/runtime/config.py, runtime/zero/config.py), so a
user's ds_config.json works unchanged. Keys that a command-line value also sets (FLAG_KEYS) follow one rule:
a key the JSON leaves out, or sets to "auto" (Hugging Face's convention), takes the command line's value
(`cli`); an explicit JSON value that disagrees with a value the user set (`user_set`) is an error showing
both. Batch sizes follow DeepSpeed: train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x dp, the missing one inferred. Every mistake is a ConfigError naming the key:
unknown keys (with the closest known one), DeepSpeed features megaengine does not implement, wrong types,
malformed JSON (file, line, column), inconsistent batch sizes.

Accepted, with no effect on results (knobs of DeepSpeed's own implementation): contiguous_gradients (always
contiguous), allgather_partitions and allgather_bucket_size (updated parameters are all-gathered per reduce
bucket), sub_group_size (the step runs per bucket), stage3_max_reuse_distance (a parameter is always released
after use), stage3_gather_16bit_weights_on_model_save (checkpoints always hold the full module state),
round_robin_gradients, zero_allow_untested_optimizer, offload pin_memory.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import dataclass, field

from megaengine.parallel.mesh import ConfigError

OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction"}
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
}
SCHEMA = {
    "train_batch_size": None, "train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": None,
    "gradient_clipping": None, "steps_per_print": None, "wall_clock_breakdown": None, "prescale_gradients": None,
    "optimizer": {"type": None, "params": OPTIMIZER_PARAMS},
    "scheduler": {"type": None, "params": set().union(*SCHEDULER_PARAMS.values())},
    "fp16": {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale"},
    "bf16": {"enabled"},
    "zero_optimization": {
        "stage": None, "overlap_comm": None, "contiguous_gradients": None, "reduce_scatter": None,
        "reduce_bucket_size": None, "allgather_partitions": None, "allgather_bucket_size": None,
        "offload_optimizer": {"device", "pin_memory"}, "offload_param": {"device", "pin_memory"},
        "sub_group_size": None, "stage3_prefetch_bucket_size": None, "stage3_param_persistence_threshold": None,
        "stage3_max_live_parameters": None, "stage3_max_reuse_distance": None,
        "stage3_gather_16bit_weights_on_model_save": None, "round_robin_gradients": None},
    "zero_allow_untested_optimizer": None,
}
# DeepSpeed keys with a meaning megaengine does not implement: refused by name rather than silently ignored.
NOT_IMPLEMENTED = {
    "amp", "activation_checkpointing", "flops_profiler", "autotuning", "elasticity", "compression_training",
    "data_efficiency", "sparse_attention", "pipeline", "aio", "communication_data_type", "gradient_predivide_factor",
    "sparse_gradients", "curriculum_learning", "tensorboard", "wandb", "csv_monitor", "comms_logger",
    "fp16.auto_cast", "zero_optimization.offload_optimizer.nvme_path", "zero_optimization.offload_param.nvme_path",
    "zero_optimization.offload_optimizer.buffer_count", "zero_optimization.offload_optimizer.ratio",
    "zero_optimization.zero_hpz_partition_size", "zero_optimization.zero_quantized_weights",
    "zero_optimization.zero_quantized_gradients", "zero_optimization.mics_shard_size",
    "zero_optimization.cpu_offload", "zero_optimization.elastic_checkpoint",
}
# JSON key -> the `cli` value(s) it stands for: the value it takes when left out or "auto", and must agree with.
FLAG_KEYS = {
    "train_batch_size": "global_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "clip_grad",
    "optimizer.params.lr": "lr", "optimizer.params.eps": "adam_eps", "optimizer.params.weight_decay": "weight_decay",
    "optimizer.params.betas": ("adam_beta1", "adam_beta2"),
    "scheduler.params.warmup_max_lr": "lr", "scheduler.params.warmup_min_lr": "min_lr",
    "scheduler.params.warmup_num_steps": "warmup_steps", "scheduler.params.total_num_steps": "train_iters",
    "fp16.enabled": "fp16", "bf16.enabled": "bf16", "zero_optimization.stage": "zero_stage",
    "zero_optimization.reduce_bucket_size": "reduce_bucket_size", "zero_optimization.overlap_comm": "overlap_comm",
}
# "auto" sizes from the model width, Hugging Face's rule; DeepSpeed's default without `hidden_size`.
AUTO_FROM_HIDDEN = {"zero_optimization.reduce_bucket_size": lambda h: h * h,
                    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h}
AUTO_OPTIONAL = {"scheduler.params.warmup_min_lr": 0.0, "fp16.enabled": False, "bf16.enabled": False}
CLI_FLAGS = {"global_batch_size": "--global-batch-size", "micro_batch_size": "--micro-batch-size",
             "gradient_accumulation_steps": "--global-batch-size", "clip_grad": "--clip-grad", "lr": "--lr",
             "adam_eps": "--adam-eps", "weight_decay": "--weight-decay", "adam_beta1": "--adam-beta1",
             "adam_beta2": "--adam-beta2", "min_lr": "--min-lr", "warmup_steps": "--lr-warmup-iters",
             "train_iters": "--train-iters", "fp16": "--fp16", "bf16": "--bf16",
             "zero_stage": "--use-distributed-optimizer", "reduce_bucket_size": "--ddp-bucket-size",
             "overlap_comm": "--overlap-grad-reduce"}


@dataclass(frozen=True)
class FP16Config:
    enabled: bool = False
    loss_scale: float = 0.0  # 0: dynamic
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0


@dataclass(frozen=True)
class OptimizerConfig:
    type: str = "AdamW"
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    adam_w_mode: bool = True  # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false


@dataclass(frozen=True)
class SchedulerConfig:
    type: str | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    overlap_comm: bool = False  # DeepSpeed: true by default at stage 3 only
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: int = 500_000_000
    offload_optimizer: str = "none"  # the device: "none" or "cpu"
    sub_group_size: int = 1_000_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False


@dataclass(frozen=True)
class DeepSpeedConfig:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    dp_size: int = 1
    gradient_clipping: float = 0.0
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    prescale_gradients: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fp16: FP16Config = field(default_factory=FP16Config)
    bf16: bool = False
    zero_optimization: ZeroConfig = field(default_factory=ZeroConfig)
    explicit: frozenset = frozenset()  # the keys the JSON gave a value (not "auto"), e.g. "optimizer.params.lr"


# -- reading ----------------------------------------------------------------------------------------------
def _read(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict), "<dict>"
    path = os.fspath(path_or_dict)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path!r}: {e.strerror}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(data).__name__}.")
    return data, path


def _check_keys(data: dict, schema, where: str, source: str) -> None:
    for key, value in data.items():
        path = f"{where}{key}"
        if path in NOT_IMPLEMENTED:
            raise ConfigError(f"{source}: '{path}' is a DeepSpeed feature megaengine does not implement; remove it.")
        known = schema if isinstance(schema, set) else set(schema)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean '{where}{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
            raise ConfigError(f"{source}: unknown key '{path}'.{hint}")
        sub = schema.get(key) if isinstance(schema, dict) else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' must be an object, got {value!r}.")
            _check_keys(value, sub, path + ".", source)


def _get(data: dict, path: str, default=None):
    node = data
    for k in path.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def _set(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = data
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value


def _leaf_paths(data: dict, prefix: str = ""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaf_paths(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _auto_paths(data: dict):
    return [p for p in _leaf_paths(data) if _get(data, p) == "auto"]


def _resolve_auto(data: dict, cli: dict, source: str) -> None:
    for path in _auto_paths(data):
        if path in AUTO_FROM_HIDDEN:
            if cli.get("hidden_size") is None:
                _set(data, path, getattr(ZeroConfig(), path.split(".")[-1]))
            else:
                _set(data, path, AUTO_FROM_HIDDEN[path](int(cli["hidden_size"])))
            continue
        src = FLAG_KEYS.get(path)
        if src is None:
            raise ConfigError(f"{source}: '{path}' cannot be \"auto\"; give a value.")
        names = src if isinstance(src, tuple) else (src,)
        values = [cli.get(n) for n in names]
        if any(v is None for v in values):
            if path in AUTO_OPTIONAL:
                _set(data, path, AUTO_OPTIONAL[path])
                continue
            if path in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
                _set(data, path, None)  # inferred from the other two below
                continue
            missing = [n for n, v in zip(names, values) if v is None]
            flags = ", ".join(CLI_FLAGS.get(n, n) for n in missing)
            raise ConfigError(f"{source}: '{path}' is \"auto\" but no command-line value was given for it ({flags}).")
        _set(data, path, list(values) if isinstance(src, tuple) else values[0])


def _fill_left_out(data: dict, cli: dict) -> None:
    """A key the JSON leaves out takes the command line's value, exactly as "auto" would (a scheduler's keys only
    when the JSON's scheduler takes them: the command line's own schedule is not a DeepSpeed one)."""
    takes = SCHEDULER_PARAMS.get(_get(data, "scheduler.type"), set())
    for path, src in FLAG_KEYS.items():
        if _get(data, path) is not None or (path.startswith("scheduler.") and path.split(".")[-1] not in takes):
            continue
        names = src if isinstance(src, tuple) else (src,)
        if all(n in cli for n in names):
            _set(data, path, [cli[n] for n in names] if isinstance(src, tuple) else cli[src])


# -- batch sizes ------------------------------------------------------------------------------------------
def resolve_batch(train: int | None, micro: int | None, gas: int | None, dp: int, source: str = "config"):
    """DeepSpeed's rule: any two of (train_batch_size, micro, accumulation) give the third; one alone: gas=1."""
    if train is not None and micro is not None and gas is not None:
        pass
    elif train is not None and micro is not None:
        gas = max(1, train // (micro * dp))
    elif train is not None and gas is not None:
        micro = max(1, train // (gas * dp))
    elif micro is not None and gas is not None:
        train = micro * gas * dp
    elif train is not None:
        gas, micro = 1, max(1, train // dp)
    elif micro is not None:
        gas, train = 1, micro * dp
    else:
        raise ConfigError(f"{source}: give train_batch_size or train_micro_batch_size_per_gpu "
                          "(or --global-batch-size / --micro-batch-size on the command line).")
    if train != micro * gas * dp:
        raise ConfigError(
            f"{source}: train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {gas} x dp {dp} = {micro * gas * dp}. Make them agree, or leave one "
            "out (or \"auto\") to have it inferred.")
    return train, micro, gas


def _check_cli_agrees(data: dict, cli: dict, user_set: set, source: str) -> None:
    """A JSON value for a setting the user also chose on the command line must be the same."""
    for path, src in FLAG_KEYS.items():
        names = src if isinstance(src, tuple) else (src,)
        value = _get(data, path)
        if value is None or not any(n in user_set for n in names) or any(n not in cli for n in names):
            continue
        want = [cli[n] for n in names] if isinstance(src, tuple) else cli[src]
        same = (list(map(float, value)) == list(map(float, want)) if isinstance(src, tuple)
                else value == want if isinstance(want, bool) or isinstance(value, bool)
                else float(value) == float(want))
        if not same:
            flags = " / ".join(CLI_FLAGS.get(n, n) for n in names)
            raise ConfigError(f"{source}: '{path}' is {value} but {flags} is {want}; make them agree, or set the "
                              "JSON value to \"auto\" (or leave it out) to take the command line's.")


# -- typed fields -----------------------------------------------------------------------------------------
def _typed(data: dict, path: str, kind, default, source: str):
    value = _get(data, path, default)
    if value is None:
        return default
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        raise ConfigError(f"{source}: '{path}' must be {kind.__name__}, got {value!r}.")
    return kind(value)


def _optimizer(data, source) -> OptimizerConfig:
    d = OptimizerConfig()
    kind = _typed(data, "optimizer.type", str, "AdamW", source)
    if kind.lower() not in ("adam", "adamw"):
        raise ConfigError(f"{source}: optimizer.type {kind!r} is not implemented; use \"Adam\" or \"AdamW\".")
    betas = _get(data, "optimizer.params.betas", list(d.betas))
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"{source}: 'optimizer.params.betas' must be two numbers in [0, 1), got {betas!r}.")
    adam_w = _typed(data, "optimizer.params.adam_w_mode", bool, True, source) if kind.lower() == "adam" else True
    return OptimizerConfig(type=kind, lr=_typed(data, "optimizer.params.lr", float, d.lr, source),
                           betas=(float(betas[0]), float(betas[1])),
                           eps=_typed(data, "optimizer.params.eps", float, d.eps, source),
                           weight_decay=_typed(data, "optimizer.params.weight_decay", float, d.weight_decay, source),
                           adam_w_mode=adam_w)


def _scheduler(data, source) -> SchedulerConfig:
    if "scheduler" not in data:
        return SchedulerConfig()
    kind = _typed(data, "scheduler.type", str, None, source)
    if kind not in SCHEDULER_PARAMS:
        close = difflib.get_close_matches(str(kind), list(SCHEDULER_PARAMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: scheduler.type {kind!r} is not implemented; use one of "
                          f"{', '.join(SCHEDULER_PARAMS)}.{hint}")
    params = dict(_get(data, "scheduler.params", {}) or {})
    for k in params:
        if k not in SCHEDULER_PARAMS[kind]:
            raise ConfigError(f"{source}: 'scheduler.params.{k}' is not a parameter of {kind}; it takes "
                              f"{', '.join(sorted(SCHEDULER_PARAMS[kind]))}.")
    if kind != "WarmupLR" and params.get("total_num_steps") is None:
        raise ConfigError(f"{source}: scheduler {kind} needs 'scheduler.params.total_num_steps' "
                          "(or \"auto\" with --train-iters).")
    if params.get("warmup_type", "log") not in ("log", "linear"):
        raise ConfigError(f"{source}: 'scheduler.params.warmup_type' must be \"log\" or \"linear\", "
                          f"got {params['warmup_type']!r}.")
    return SchedulerConfig(type=kind, params=params)


def _zero(data, source) -> ZeroConfig:
    d, z = ZeroConfig(), "zero_optimization."
    stage = _typed(data, z + "stage", int, 0, source)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage}.")
    for key in ("offload_param", "offload_optimizer"):
        device = _get(data, f"{z}{key}.device", "none")
        if key == "offload_param" and device not in ("none", None):
            raise ConfigError(f"{source}: '{z}offload_param' (device {device!r}) is not implemented; remove it or "
                              "set its device to \"none\". offload_optimizer {\"device\": \"cpu\"} is supported.")
        if device not in ("none", "cpu", None):
            raise ConfigError(f"{source}: '{z}{key}.device' {device!r} is not implemented (NVMe offload); use "
                              "\"cpu\" or \"none\".")
    offload = _get(data, z + "offload_optimizer.device", "none") or "none"
    if offload == "cpu" and stage == 0:
        raise ConfigError(f"{source}: '{z}offload_optimizer' needs stage >= 1, got stage 0.")
    ints = ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance")
    bools = ("contiguous_gradients", "reduce_scatter", "allgather_partitions",
             "stage3_gather_16bit_weights_on_model_save")
    values = {k: _typed(data, z + k, int, getattr(d, k), source) for k in ints}
    values.update({k: _typed(data, z + k, bool, getattr(d, k), source) for k in bools})
    for k in ints:
        if values[k] < (0 if k == "stage3_param_persistence_threshold" else 1):
            raise ConfigError(f"{source}: '{z}{k}' must be positive, got {values[k]}.")
    overlap = _typed(data, z + "overlap_comm", bool, stage == 3, source)
    return ZeroConfig(stage=stage, overlap_comm=overlap, offload_optimizer=offload, **values)


def _fp16(data, source) -> FP16Config:
    d, f = FP16Config(), "fp16."
    cfg = FP16Config(
        enabled=_typed(data, f + "enabled", bool, False, source),
        loss_scale=_typed(data, f + "loss_scale", float, d.loss_scale, source),
        initial_scale_power=_typed(data, f + "initial_scale_power", int, d.initial_scale_power, source),
        loss_scale_window=_typed(data, f + "loss_scale_window", int, d.loss_scale_window, source),
        hysteresis=_typed(data, f + "hysteresis", int, d.hysteresis, source),
        consecutive_hysteresis=_typed(data, f + "consecutive_hysteresis", bool, d.consecutive_hysteresis, source),
        min_loss_scale=_typed(data, f + "min_loss_scale", float, d.min_loss_scale, source))
    for name in ("loss_scale_window", "hysteresis", "min_loss_scale"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{source}: 'fp16.{name}' must be positive, got {getattr(cfg, name)}.")
    if cfg.loss_scale < 0:
        raise ConfigError(f"{source}: 'fp16.loss_scale' must be 0 (dynamic) or positive, got {cfg.loss_scale}.")
    return cfg


def load_config(path_or_dict, *, cli: dict | None = None, user_set=None) -> DeepSpeedConfig:
    """Read, check and resolve a DeepSpeed config. `cli` holds the command line's values for FLAG_KEYS (used for
    keys left out or "auto") and `dp_size` (default 1); `user_set` names those of them that the user chose
    (default: all), which an explicit JSON value must agree with."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    user_set = set(cli) if user_set is None else set(user_set) & set(cli)
    data, source = _read(path_or_dict)
    _check_keys(data, SCHEMA, "", source)
    explicit = frozenset(p for p in _leaf_paths(data) if _get(data, p) != "auto")
    _resolve_auto(data, cli, source)
    _check_cli_agrees(data, cli, user_set, source)
    _fill_left_out(data, cli)
    dp = int(cli.get("dp_size", 1))
    train, micro, gas = (_typed(data, k, int, None, source) for k in
                         ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))
    for name, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                    ("gradient_accumulation_steps", gas)):
        if v is not None and v < 1:
            raise ConfigError(f"{source}: '{name}' must be >= 1, got {v}.")
    train, micro, gas = resolve_batch(train, micro, gas, dp, source)
    fp16 = _fp16(data, source)
    bf16 = _typed(data, "bf16.enabled", bool, False, source)
    if fp16.enabled and bf16:
        raise ConfigError(f"{source}: fp16.enabled and bf16.enabled are both true; enable one.")
    clip = _typed(data, "gradient_clipping", float, 0.0, source)
    if clip < 0:
        raise ConfigError(f"{source}: 'gradient_clipping' must be >= 0, got {clip}.")
    return DeepSpeedConfig(
        train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas, dp_size=dp,
        gradient_clipping=clip, steps_per_print=_typed(data, "steps_per_print", int, 10, source),
        wall_clock_breakdown=_typed(data, "wall_clock_breakdown", bool, False, source),
        prescale_gradients=_typed(data, "prescale_gradients", bool, False, source),
        optimizer=_optimizer(data, source), scheduler=_scheduler(data, source), fp16=fp16, bf16=bf16,
        zero_optimization=_zero(data, source), explicit=explicit)


# -- what the optimizer does ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimConfig:
    """AdamW, gradient clipping, ZeRO, loss scaling and the LR schedule, once flags and JSON are resolved. The one
    input of `ZeroOptimizer.from_config`, for pretrain_gpt.py and for engines alike."""
    lr: float
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"  # Megatron's schedule (training.lr_schedule), unless `scheduler` is set
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    adam_w_mode: bool = True
    clip_grad: float = 0.0
    prescale_gradients: bool = False
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    fp16: FP16Config = field(default_factory=FP16Config)  # loss scaling, used when `fp16.enabled`
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # DeepSpeed's; type None: none

    @classmethod
    def from_deepspeed(cls, ds: DeepSpeedConfig, **megatron_schedule) -> "OptimConfig":
        o = ds.optimizer
        return cls(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, adam_w_mode=o.adam_w_mode,
                   clip_grad=ds.gradient_clipping, prescale_gradients=ds.prescale_gradients,
                   zero=ds.zero_optimization, fp16=ds.fp16, scheduler=ds.scheduler, **megatron_schedule)

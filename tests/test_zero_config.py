"""DeepSpeed JSON configs: keys, "auto" resolution, batch-size inference and every error."""
import json
from pathlib import Path

import pytest

from megaengine.parallel import ConfigError
from megaengine.zero import load_config, scheduler_lr
from megaengine.zero.config import SchedulerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "zero"
CLI = dict(micro_batch_size=4, global_batch_size=64, dp_size=8, lr=3e-4, min_lr=3e-5, clip_grad=1.0,
           adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1, warmup_steps=100, train_iters=1000,
           bf16=True, hidden_size=256)


@pytest.mark.parametrize("name,stage,offload", [("zero0", 0, "none"), ("zero1", 1, "none"), ("zero2", 2, "none"),
                                                ("zero3", 3, "none"), ("zero2-offload", 2, "cpu")])
def test_shipped_configs_resolve_auto_from_the_command_line(name, stage, offload):
    c = load_config(CONFIGS / f"{name}.json", cli=CLI)
    z = c.zero_optimization
    assert (z.stage, z.offload_optimizer) == (stage, offload)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (64, 4, 2)
    assert (c.optimizer.lr, c.optimizer.betas, c.optimizer.weight_decay) == (3e-4, (0.9, 0.95), 0.1)
    assert c.gradient_clipping == 1.0 and c.bf16 and not c.fp16.enabled
    assert z.reduce_bucket_size == 256 * 256  # Hugging Face's "auto": hidden_size^2
    if stage == 3:
        assert z.overlap_comm and z.stage3_param_persistence_threshold == 2560
        assert z.stage3_prefetch_bucket_size == int(0.9 * 256 * 256)


def test_defaults_follow_deepspeed():
    c = load_config({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
    assert (c.train_batch_size, c.gradient_accumulation_steps) == (2, 1)
    z = c.zero_optimization
    assert z.overlap_comm and z.reduce_bucket_size == 500_000_000 and z.stage3_param_persistence_threshold == 100_000
    assert not load_config({"train_batch_size": 4, "zero_optimization": {"stage": 2}}).zero_optimization.overlap_comm
    f = load_config({"train_batch_size": 4, "fp16": {"enabled": True}}).fp16
    assert (f.loss_scale, f.initial_scale_power, f.loss_scale_window, f.hysteresis, f.min_loss_scale) == \
        (0.0, 16, 1000, 2, 1.0)
    o = load_config({"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}).optimizer
    assert not o.adam_w_mode


@pytest.mark.parametrize("given,expected", [
    (dict(train_batch_size=32, train_micro_batch_size_per_gpu=2), (32, 2, 4)),
    (dict(train_batch_size=32, gradient_accumulation_steps=2), (32, 4, 2)),
    (dict(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3), (24, 2, 3)),
    (dict(train_batch_size=16), (16, 4, 1)),
    (dict(train_micro_batch_size_per_gpu=3), (12, 3, 1)),
])
def test_batch_size_inference(given, expected):
    c = load_config(given, cli={"dp_size": 4})
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == expected


def _error(config, cli=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, cli=cli)
    return str(e.value)


def test_inconsistent_batch_sizes_show_both_numbers():
    msg = _error(dict(train_batch_size=30, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2),
                 {"dp_size": 4})
    assert "30" in msg and "16" in msg and "train_batch_size" in msg
    msg = _error({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 8},
                 {"micro_batch_size": 4, "global_batch_size": 32})
    assert "train_micro_batch_size_per_gpu" in msg and "8" in msg and "4" in msg and "--micro-batch-size" in msg


def test_unknown_keys_suggest_the_closest_known_key():
    assert "Did you mean 'gradient_clipping'" in _error({"train_batch_size": 1, "gradient_cliping": 1.0})
    msg = _error({"train_batch_size": 1, "zero_optimization": {"stage3_prefetch_bucket": 1}})
    assert "'zero_optimization.stage3_prefetch_bucket'" in msg and "stage3_prefetch_bucket_size" in msg
    assert "'fp16.initial_scale_power'" in _error({"train_batch_size": 1, "fp16": {"initial_scale_powr": 8}})


@pytest.mark.parametrize("config,key", [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer.device"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}}, "nvme_path"),
    ({"amp": {"enabled": True}}, "amp"),
    ({"activation_checkpointing": {}}, "activation_checkpointing"),
    ({"optimizer": {"type": "Lamb"}}, "Lamb"),
    ({"scheduler": {"type": "OneCycle"}}, "OneCycle"),
])
def test_unimplemented_deepspeed_features_name_the_key(config, key):
    assert key in _error({"train_batch_size": 1, **config})


@pytest.mark.parametrize("config,words", [
    ({"zero_optimization": {"stage": 4}}, ["zero_optimization.stage", "4"]),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, ["offload_optimizer", "stage"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ["fp16", "bf16"]),
    ({"gradient_clipping": "big"}, ["gradient_clipping", "'big'"]),
    ({"optimizer": {"params": {"betas": [0.9]}}}, ["optimizer.params.betas"]),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}}, ["total_num_steps"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 10}}}, ["total_num_steps", "WarmupLR"]),
    ({"fp16": {"enabled": True, "hysteresis": 0}}, ["fp16.hysteresis"]),
])
def test_bad_values_are_config_errors(config, words):
    msg = _error({"train_batch_size": 1, **config})
    assert all(w in msg for w in words), msg


def test_auto_without_a_command_line_value_names_the_flag():
    msg = _error({"train_batch_size": 8, "optimizer": {"params": {"lr": "auto"}}})
    assert "optimizer.params.lr" in msg and "--lr" in msg
    assert "--micro-batch-size" in _error({"train_micro_batch_size_per_gpu": "auto"})


def test_explicit_value_disagreeing_with_the_command_line():
    msg = _error({"train_batch_size": 8, "optimizer": {"params": {"lr": 1e-3}}}, {"lr": 3e-4})
    assert "0.001" in msg and "0.0003" in msg and "--lr" in msg


def test_malformed_json_reports_file_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    msg = _error(path)
    assert f"{path}:3:" in msg and "malformed JSON" in msg
    assert "cannot read" in _error(tmp_path / "missing.json")
    path.write_text(json.dumps([1, 2]))
    assert "object" in _error(path)


def test_deepspeed_lr_schedules():
    warm = SchedulerConfig("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 1.0, "warmup_num_steps": 4,
                                        "warmup_type": "linear"})
    assert [scheduler_lr(warm, 9.0, i) for i in range(-1, 6)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    decay = SchedulerConfig("WarmupDecayLR", {**warm.params, "total_num_steps": 8})
    assert [scheduler_lr(decay, 9.0, i) for i in (4, 6, 8, 10)] == [1.0, 0.5, 0.0, 0.0]
    log_warm = SchedulerConfig("WarmupLR", {"warmup_num_steps": 10})  # log warm-up to the optimizer's lr
    assert scheduler_lr(log_warm, 2.0, 4) == pytest.approx(2.0 * 0.6989700043360187)
    cos = SchedulerConfig("WarmupCosineLR", {"total_num_steps": 12, "warmup_num_steps": 2, "warmup_type": "linear",
                                             "cos_min_ratio": 0.1})
    assert scheduler_lr(cos, 2.0, 1) == pytest.approx(1.0)
    assert scheduler_lr(cos, 2.0, 6) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway through the cosine
    assert scheduler_lr(cos, 2.0, 50) == pytest.approx(0.2)

"""One configuration from flags, preset and DeepSpeed JSON: a key the JSON leaves out takes the flags' value, an
explicit one must agree with what the user set, and what came from where is printed (issue 10.1 and 10.5)."""
import json
import re
import subprocess
import sys

import pytest

from megaengine.config import resolve
from megaengine.errors import ConfigError
from megaengine.training.args import build_parser

TINY = ["--config", "configs/gpt-tiny.json", "--num-layers", "4", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "4"]


def with_json(tmp_path, content, *extra, world=1):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return resolve(TINY + ["--zero-config", str(path), *extra], world)


def test_keys_left_out_take_the_flags_values(tmp_path):
    plain = resolve(TINY)
    cfg = with_json(tmp_path, {"zero_optimization": {"stage": 1}}, world=2)
    o, p = cfg.optim, plain.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad) == (p.lr, p.betas, p.eps, p.weight_decay, p.clip_grad)
    assert o.betas == (0.9, 0.95) and o.weight_decay == 0.1 and o.clip_grad == 1.0  # the preset's values
    assert (o.min_lr, o.lr_decay_style, o.lr_warmup_iters, o.scheduler.type) == (p.min_lr, "cosine", 20, None)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.precision) == (8, 2, "fp32")
    assert o.zero.stage == 1 and p.zero.stage == 0


def test_the_issue_repro_resolves_to_the_flags(tmp_path):
    """`"auto"` batch and clipping, no optimizer section: what ran used to mix DeepSpeed's AdamW defaults in."""
    cfg = with_json(tmp_path, {"zero_optimization": {"stage": 1}, "train_batch_size": "auto",
                               "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"})
    plain = resolve(TINY)
    assert cfg.optim == plain.optim.__class__(**{**plain.optim.__dict__, "zero": cfg.optim.zero})
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1


def test_no_gradient_clipping_key_keeps_clip_grad(tmp_path):
    assert with_json(tmp_path, {"zero_optimization": {"stage": 2}}).optim.clip_grad == 1.0
    assert with_json(tmp_path, {"zero_optimization": {"stage": 2}}, "--clip-grad", "0.5").optim.clip_grad == 0.5


def test_batch_flags_with_a_stage_only_json_are_accepted(tmp_path):
    cfg = with_json(tmp_path, {"zero_optimization": {"stage": 1}}, world=2)
    assert cfg.train.micro_batches(cfg.parallel.dp) == 2


@pytest.mark.parametrize("content,words", [
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, ["betas", "0.999", "--adam-beta2", "0.95"]),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.0}}}, ["weight_decay", "0.0", "--weight-decay", "0.1"]),
    ({"gradient_clipping": 0.0}, ["gradient_clipping", "--clip-grad", "1.0"]),
    ({"train_batch_size": 16}, ["train_batch_size", "16", "--global-batch-size", "8"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}, ["warmup_num_steps", "--lr-warmup-iters"]),
])
def test_explicit_json_values_disagreeing_with_set_flags_stop_the_run(tmp_path, content, words):
    with pytest.raises(ConfigError) as e:
        with_json(tmp_path, {"zero_optimization": {"stage": 1}, **content})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_json_values_replace_defaults_nobody_set_and_say_so(tmp_path):
    cfg = with_json(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                               "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}})
    assert cfg.optim.eps == 1e-6 and cfg.train.precision == "bf16"
    assert cfg.sources["adam_eps"] == "json" and cfg.sources["bf16"] == "json"
    assert cfg.sources["adam_beta2"] == "preset" and cfg.sources["lr"] == "preset"
    text = cfg.summary()
    assert "eps 1e-06 [json]" in text and "precision  bf16 [json]" in text and "ZeRO stage 2 [json]" in text
    assert "betas (0.9, 0.95 [preset])" in text and "4 [flag] iterations" in text


def test_a_json_scheduler_and_a_set_megatron_schedule_clash(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}))
    flags = [a for a in TINY if a not in ("--config", "configs/gpt-tiny.json")]
    flags += ["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--lr", "1e-3"]
    assert resolve(flags + ["--zero-config", str(path)]).optim.scheduler.type == "WarmupLR"
    with pytest.raises(ConfigError, match="--lr-decay-style linear"):
        resolve(flags + ["--zero-config", str(path), "--lr-decay-style", "linear"])
    with pytest.raises(ConfigError, match="--lr-decay-style cosine [(]preset[)]"):  # gpt-tiny sets Megatron's
        with_json(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 20}}})


def test_vocab_size_flag_with_a_tokenizer_model_is_two_sources(tiny_corpus):
    prefix, tok = tiny_corpus
    argv = TINY + ["--data-path", prefix, "--tokenizer-model", tok]
    assert resolve(argv).model.vocab_size == 512  # the tokenizer's, not the preset's embedded-corpus 4096
    with pytest.raises(ConfigError, match="drop --vocab-size"):
        resolve(argv + ["--vocab-size", "4096"])


def test_config_is_frozen():
    cfg = resolve(TINY)
    with pytest.raises(AttributeError):
        cfg.model.num_layers = 3
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0


def test_help_gives_every_flag_one_line_and_at_most_one_default():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    out = subprocess.run([sys.executable, "pretrain_gpt.py", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.count("--") > 60
    for block in re.split(r"\n  (?=-)", out.stdout):
        assert block.count("default:") <= 1, block


def test_recompute_flags_become_the_models_recompute_config():
    from megaengine.models import GPTConfig
    from megaengine.models.recompute import RecomputeConfig
    assert resolve(TINY).model.recompute == RecomputeConfig()
    assert resolve(TINY + ["--recompute-activations"]).model.recompute == RecomputeConfig("selective")
    cfg = resolve(TINY + ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers",
                          "2"])
    assert cfg.model.recompute == RecomputeConfig("full", "block", 2)
    assert GPTConfig.from_dict(cfg.model.to_dict()) == cfg.model  # checkpoints store the model as a dict
    assert "recompute full (block, 2)" in cfg.summary()
    full_without_n = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
    for extra, flag in ((["--recompute-activations", "--recompute-granularity", "full"], "--recompute-activations"),
                        (full_without_n, "--recompute-num-layers"),
                        (["--recompute-num-layers", "2"], "--recompute-num-layers")):
        with pytest.raises(ConfigError, match=flag):
            resolve(TINY + extra)

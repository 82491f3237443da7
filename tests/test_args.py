"""Flags, preset and DeepSpeed JSON resolved into the Config: every user mistake named with its flag, its value
and the fix."""
import json

import pytest

from megaengine.parallel import ConfigError
from megaengine.config import resolve

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-3"]


def check(argv, world=4):
    return resolve(BASE + argv, world)


@pytest.mark.parametrize("argv,world,needle", [
    (["--tp", "3"], 4, "world size 4 is not divisible by tp x pp = 3 x 1"),
    (["--tp", "0"], 4, "--tensor-model-parallel-size must be >= 1"),
    (["--tp", "abc"], 4, "expects an integer, got 'abc'"),
    (["--hidden-size", "sixty"], 4, "--hidden-size expects an integer"),
    (["--tp", "2", "--pp", "4"], 4, "tp x pp = 2 x 4"),
    (["--tp", "4", "--num-attention-heads", "6", "--hidden-size", "96"], 4, "--num-attention-heads=6 must be divisible by tensor-parallel size 4"),
    (["--tp", "2", "--num-query-groups", "1"], 4, "--num-query-groups=1 must be divisible by tensor-parallel size 2"),
    (["--num-attention-heads", "5"], 1, "--hidden-size=64 must be divisible by --num-attention-heads (5)"),
    (["--global-batch-size", "6"], 4, "--global-batch-size=6 is not divisible by --micro-batch-size x data-parallel size = 2 x 4 = 8"),
    (["--max-position-embeddings", "16"], 1, "--seq-length=32 exceeds --max-position-embeddings (16)"),
    (["--tp", "4", "--sequence-parallel", "--seq-length", "30", "--max-position-embeddings", "30"], 4,
     "--seq-length=30 must be divisible by tensor-parallel size 4"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are both set"),
    (["--load", "/nonexistent/ckpt"], 1, "--load /nonexistent/ckpt: no checkpoint there"),
    # The missing data is the real problem, named before the missing tokenizer (issue 10.2).
    (["--data-path", "/nonexistent/foo"], 1, "--data-path /nonexistent/foo: /nonexistent/foo.idx not found"),
    (["--tokenizer-model", "/nonexistent/tok.model"], 1, "--tokenizer-model /nonexistent/tok.model: no such file"),
    (["--hidden-dropout", "1.5"], 1, "--hidden-dropout=1.5 must be in [0, 1)"),
    (["--lr-decay-style", "exp"], 1, "invalid choice: 'exp'"),
    (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
    (["--pp", "4", "--num-layers", "6"], 4, "--num-layers"),
    (["--pp", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers=4 is not divisible by --pipeline-model-parallel-size x --num-layers-per-virtual-pipeline-stage = 2 x 3"),
    (["--pp", "4", "--num-layers", "4", "--global-batch-size", "4"], 4, "--global-batch-size"),
    (["--pp", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6",
      "--micro-batch-size", "2"], 2, "multiple"),
    (["--pp", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-schedule", "1f1b"],
     2, "needs --pipeline-schedule interleaved"),
])
def test_bad_input_names_flag_value_and_fix(argv, world, needle):
    with pytest.raises(ConfigError) as e:
        check(argv, world)
    assert needle in str(e.value)


def test_existing_data_without_tokenizer_asks_for_it(tiny_corpus):
    prefix, _ = tiny_corpus
    with pytest.raises(ConfigError, match="--data-path needs --tokenizer-model"):
        check(["--data-path", prefix], world=1)


def test_missing_required_flags_point_to_presets():
    with pytest.raises(ConfigError, match="missing --num-layers.*configs/gpt-tiny.json"):
        resolve(["--tp", "2"])


def test_preset_is_overridden_by_flags(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"num_layers": 7, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
                                  "micro_batch_size": 1, "global_batch_size": 4, "train_iters": 5, "lr": 1e-3}))
    cfg = resolve(["--config", str(preset), "--num-layers", "3"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.train_iters) == (3, 64, 5)


def test_preset_typo_suggests_the_key(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"num_layer": 2}))
    with pytest.raises(ConfigError, match="unknown key 'num_layer'. Did you mean 'num_layers'"):
        resolve(["--config", str(preset)])


def test_preset_bad_json_reports_line_and_column(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text('{\n  "num_layers": 2,\n  "hidden_size": ,\n}')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 3 column 18"):
        resolve(["--config", str(preset)])


def test_shipped_presets_parse_and_validate():
    import glob
    for path in sorted(glob.glob("configs/*.json")):
        resolve(["--config", path], world_size=1)


def test_good_layout_passes():
    cfg = check(["--tp", "2", "--sequence-parallel"], world=4)
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel


def test_shipped_zero_configs_resolve_against_flags():
    import glob
    stages = {}
    for path in sorted(glob.glob("configs/zero/*.json")):
        cfg = check(["--zero-config", path], world=2)
        stages[path] = cfg.optim.zero.stage
        assert cfg.train.global_batch_size == 8 and cfg.train.micro_batches(cfg.parallel.dp) == 2
    assert sorted(set(stages.values())) == [0, 1, 2, 3], stages


def test_zero_config_disagreeing_with_flags_shows_both_numbers(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError) as e:
        check(["--zero-config", str(path)], world=2)
    assert "32" in str(e.value) and "8" in str(e.value)


def test_zero_config_typo_suggests_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ConfigError, match="zero_optimization"):
        check(["--zero-config", str(path)], world=2)


def test_zero3_with_pipeline_is_refused():
    with pytest.raises(ConfigError, match="stage 3 with --pipeline-model-parallel-size 2"):
        check(["--zero-config", "configs/zero/zero3.json", "--pp", "2"], world=4)

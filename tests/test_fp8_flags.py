"""--fp8-* flags: resolved into GPTConfig.fp8, refused where FP8 cannot run (no --bf16, --fp16, a GPU without FP8,
shapes FP8 matmuls cannot take on CUDA), shown in the summary, kept through a checkpoint's model dict; FP8 state
on exactly the transformer layers' linears."""
import json

import pytest
import torch

from megaengine.config import resolve
from megaengine.errors import ConfigError
from megaengine.fp8 import FP8Config
from megaengine.models.gpt import GPTConfig

TINY = ["--config", "configs/gpt-tiny.json", "--micro-batch-size", "2", "--global-batch-size", "8"]


def test_flags_resolve_into_the_model_config_and_the_summary():
    cfg = resolve(TINY + ["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "16",
                          "--fp8-amax-compute-algo", "max"])
    assert cfg.model.fp8 == FP8Config(format="hybrid", recipe="delayed", amax_history_len=16, amax_compute_algo="max")
    line = next(x for x in cfg.summary().splitlines() if x.strip().startswith("fp8"))
    assert "hybrid [flag] (e4m3 forward, e5m2 gradients)" in line and "delayed scaling" in line
    assert "amax history 16 [flag] steps, max [flag]" in line
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.model.to_dict()))) == cfg.model  # as a checkpoint keeps it
    assert resolve(TINY).model.fp8 is None and "fp8" not in resolve(TINY).summary()
    tensorwise = resolve(TINY + ["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"])
    assert "tensorwise [flag] scaling" in tensorwise.summary() and "history" not in tensorwise.summary()


@pytest.mark.parametrize("argv,needle", [
    (["--fp8-format", "hybrid"], "--fp8-format hybrid needs --bf16"),
    (["--fp16", "--fp8-format", "e4m3"], "--fp8-format e4m3 does not work with --fp16"),
    (["--bf16", "--fp8-recipe", "rowwise"], "--fp8-recipe=rowwise (flag) sets FP8 scaling but FP8 is off"),
    (["--bf16", "--fp8-format", "hybrid", "--fp8-margin", "-1"], "--fp8-margin=-1"),
    (["--bf16", "--fp8-format", "e5m2"], "argument --fp8-format: invalid choice"),
])
def test_bad_fp8_flags_name_the_flag_and_the_fix(argv, needle):
    with pytest.raises(ConfigError) as e:
        resolve(TINY + argv)
    assert needle in str(e.value)


def test_fp16_from_a_deepspeed_json_is_refused_too(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="does not work with --fp16"):
        resolve(TINY + ["--zero-config", str(path), "--fp8-format", "hybrid"])


def _on_a_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")


def test_a_gpu_without_fp8_stops_the_run_before_anything_starts(monkeypatch):
    _on_a_gpu(monkeypatch, (8, 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"cuda:1 is NVIDIA A100-SXM4-80GB \(compute capability 8.0\)"):
        resolve(TINY + ["--bf16", "--fp8-format", "hybrid"])
    resolve(TINY + ["--bf16"])  # bf16 alone is fine there


def test_shapes_fp8_matmuls_cannot_take_on_cuda_are_refused(monkeypatch):
    _on_a_gpu(monkeypatch, (9, 0))
    fp8 = ["--bf16", "--fp8-format", "hybrid"]
    assert resolve(TINY + fp8).model.fp8 is not None  # hidden 128, ffn 512, 4 heads of 32, 2 x 128 tokens
    with pytest.raises(ConfigError, match=r"--hidden-size = 120 is not a multiple of 16"):
        resolve(TINY + fp8 + ["--hidden-size", "120", "--num-attention-heads", "4"])
    with pytest.raises(ConfigError, match=r"tokens per micro-batch and rank\) = 100"):
        resolve(TINY + fp8 + ["--seq-length", "50"])
    with pytest.raises(ConfigError, match=r"tokens per micro-batch and rank\) = 8"):
        resolve(TINY + fp8 + ["--seq-length", "32", "--cp", "4", "--micro-batch-size", "1"], world_size=4)
    with pytest.raises(ConfigError, match=r"--ffn-hidden-size / tp = 24"):
        resolve(TINY + fp8 + ["--ffn-hidden-size", "48", "--tp", "2"], world_size=2)


def _fp8_modules(rank, world):
    from megaengine import parallel
    from megaengine.models import GPT
    parallel.initialize()
    config = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                       untie_embeddings_and_output_weights=True, fp8=FP8Config(recipe="delayed"))
    model = GPT(config)
    return sorted(name for name, m in model.named_modules() if getattr(m, "fp8", None) is not None), \
        sorted(model.state_dict())


def test_fp8_state_sits_on_the_transformer_linears_only():
    from megaengine.testing import run_distributed
    with_fp8, keys = run_distributed(_fp8_modules, 1)[0]
    assert with_fp8 == [f"layers.{i}.{m}" for i in range(2) for m in ("attention.proj", "attention.qkv", "mlp.fc1",
                                                                        "mlp.fc2")]
    assert [k for k in keys if ".fp8." in k] == sorted(f"{m}.fp8.{b}" for m in with_fp8
                                                       for b in ("amax_history", "scale"))

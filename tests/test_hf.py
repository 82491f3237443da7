"""Hugging Face interop: exported GPT-2, LLaMA and Mixtral models give transformers the same logits as megaengine,
and the weight mapping is exactly invertible."""
import json
import os
from dataclasses import replace

import pytest
import torch
import transformers  # in the dev extra: CI must run these tests, so a missing install fails loudly

import megaengine
from megaengine.models.gpt import GPT, GPTConfig
from megaengine.moe import MoEConfig
from megaengine.parallel import ConfigError, destroy, initialize
from megaengine.tools import hf, hf_tokenizer

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=101,
            hidden_dropout=0.0, attention_dropout=0.0)  # 101 tokens: padded to 128
CONFIGS = {
    "gpt2": GPTConfig(**TINY),
    "gpt2-tanh-gelu": GPTConfig(**TINY, gelu_approximate="tanh"),  # GPT-2 as OpenAI trained it (gelu_new)
    "gpt2-untied": GPTConfig(**TINY, ffn_hidden_size=48, norm_epsilon=1e-6, untie_embeddings_and_output_weights=True),
    "llama-gqa": GPTConfig(**TINY, num_query_groups=2, ffn_hidden_size=40, position_embedding_type="rope",
                           rotary_base=500.0, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                           untie_embeddings_and_output_weights=True),
    "llama-tied-bias-headdim": GPTConfig(**TINY, num_query_groups=1, kv_channels=16, ffn_hidden_size=40,
                                         position_embedding_type="rope", normalization="RMSNorm", swiglu=True),
    # Experts of the dense --ffn-hidden-size (so the HF config alone gives back every architecture field).
    "mixtral": GPTConfig(**TINY, num_query_groups=2, ffn_hidden_size=40, position_embedding_type="rope",
                         rotary_base=1e6, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                         untie_embeddings_and_output_weights=True, moe=MoEConfig(num_experts=4, moe_router_topk=2)),
}
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize()
    yield
    destroy()


def build(config: GPTConfig) -> GPT:
    """A model whose every weight differs (norm weights and biases too), so a swapped name cannot pass."""
    model = GPT(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name in hf.VOCAB_ROWS:
                p[config.vocab_size:] = 0  # padding rows stay zero, as the model keeps them
    return model


def load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert next(model.parameters()).dtype == torch.float32
    return model.eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_export_matches_transformers_logits(name, tmp_path):
    config = CONFIGS[name]
    model = build(config)
    hf.export(model, config, str(tmp_path))
    theirs = load_transformers(str(tmp_path))
    assert type(theirs).__name__ == HF_CLASSES[name.split("-")[0]]
    ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=torch.Generator().manual_seed(1))
    ours = model.full_logits(ids)
    with torch.no_grad():
        ref = theirs(ids).logits
    assert ref.shape == ours.shape == (2, config.seq_length, config.vocab_size)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_exact(name, tmp_path):
    config = CONFIGS[name]
    state = build(config).state_dict()
    hf_config, hf_state = hf.to_hf(config, state)
    back_config, back_state = hf.from_hf(hf_config, hf_state, base=config)
    assert back_config == config
    assert back_state.keys() == state.keys()
    assert all(torch.equal(back_state[k], state[k]) for k in state)
    # Without a base the architecture still comes back whole, through the files on disk too.
    hf.export(state, config, str(tmp_path))
    arch_config, disk_state = hf.load_hf(str(tmp_path))
    assert all(getattr(arch_config, k) == getattr(config, k) for k in hf.ARCHITECTURE_KEYS)
    assert all(torch.equal(disk_state[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mixtral"])
def test_loads_what_transformers_saves_sharded(name, tmp_path):
    config = CONFIGS[name]
    state = build(config).state_dict()
    hf.export(state, config, str(tmp_path / "ours"))
    load_transformers(str(tmp_path / "ours")).save_pretrained(str(tmp_path / "theirs"), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "theirs" / "model.safetensors.index.json")
    back_config, back_state = hf.load_hf(str(tmp_path / "theirs"), base=config)
    assert back_config == config
    assert all(torch.equal(back_state[k], state[k]) for k in state)


def test_mixtral_reads_transformers_5_stacked_experts(tmp_path):
    """transformers 5 holds Mixtral's experts stacked in memory (mlp.experts.gate_up_proj, down_proj) and writes
    the Hub's per-expert names; both read back to the same weights."""
    config = CONFIGS["mixtral"]
    state = build(config).state_dict()
    hf.export(state, config, str(tmp_path))
    theirs = load_transformers(str(tmp_path)).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in theirs
    back_config, back_state = hf.from_hf(json.load(open(tmp_path / "config.json")), theirs, base=config)
    assert back_config == config and all(torch.equal(back_state[k], state[k]) for k in state)


def test_mixtral_keeps_the_training_settings_and_converts_the_aux_coefficient():
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.02,
                    moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=1.5, moe_layer_freq=(1, 1))
    config = replace(CONFIGS["mixtral"], moe=moe)
    state = build(config).state_dict()
    hf_config, hf_state = hf.to_hf(config, state)
    assert hf_config["intermediate_size"] == 24 and hf_config["router_aux_loss_coef"] == 0.01  # k x ours in HF
    assert sorted(k for k in hf_state if k.startswith("model.layers.0.block_sparse_moe.experts.3.")) == [
        f"model.layers.0.block_sparse_moe.experts.3.w{j}.weight" for j in (1, 2, 3)]
    assert hf.from_hf(hf_config, hf_state, base=config)[0] == config
    fresh, _ = hf.from_hf(hf_config, hf_state)  # no base: Mixtral's sizes, MoE training settings at their defaults
    assert fresh.moe == MoEConfig(num_experts=4, moe_router_topk=2) and fresh.ffn_hidden_size == 24
    dense_between = replace(config, moe=replace(moe, moe_layer_freq=(1, 0)))
    with pytest.raises(ConfigError, match="--moe-layer-freq"):
        hf.hf_family(dense_between)


def test_unsupported_configs_name_what_blocks_them():
    rope_layernorm = GPTConfig(**TINY, position_embedding_type="rope")
    with pytest.raises(ConfigError, match="--normalization LayerNorm.*no --swiglu"):
        hf.to_hf(rope_layernorm, {})
    gqa_gpt2 = GPTConfig(**TINY, num_query_groups=2)
    with pytest.raises(ConfigError, match="--num-query-groups 2"):
        hf.hf_family(gqa_gpt2)
    with pytest.raises(ConfigError, match="model_type='bert'"):
        hf.from_hf({"model_type": "bert"}, {})


def test_refuses_shards_and_mismatched_weights():
    config = CONFIGS["llama-gqa"]
    state = build(config).state_dict()
    shard = dict(state, **{"layers.0.attention.qkv.weight": state["layers.0.attention.qkv.weight"][:32]})
    with pytest.raises(ConfigError, match="layers.0.attention.qkv.weight"):
        hf.to_hf(config, shard)
    hf_config, hf_state = hf.to_hf(config, state)
    with pytest.raises(ConfigError, match="lacks model.layers.2"):
        hf.from_hf(dict(hf_config, num_hidden_layers=3), hf_state)
    with pytest.raises(ConfigError, match="rope_type"):
        hf.from_hf(dict(hf_config, rope_parameters={"rope_type": "yarn", "factor": 4.0}), hf_state)


def test_gpt2_tanh_gelus_map_to_the_tanh_approximation():
    config = CONFIGS["gpt2"]
    hf_config, hf_state = hf.to_hf(config, build(config).state_dict())
    assert hf_config["activation_function"] == "gelu"
    for act in hf.APPROXIMATE_GELUS:
        loaded, _ = hf.from_hf(dict(hf_config, activation_function=act), hf_state, base=config)
        assert loaded.gelu_approximate == "tanh"


def write_checkpoint(root, config: GPTConfig, meta: dict) -> str:
    """A checkpoint directory holding only meta.json; tests stand in megaengine.load_model for the weights."""
    from megaengine import checkpoint
    os.makedirs(checkpoint.iteration_dir(str(root), 5))
    (root / checkpoint.POINTER).write_text("5")
    with open(os.path.join(checkpoint.iteration_dir(str(root), 5), "meta.json"), "w") as f:
        json.dump({"iteration": 5, "model": config.to_dict(), **meta}, f)
    return str(root)


def greedy(model: GPT, ids: list[int], steps: int, eod: int) -> list[int]:
    for _ in range(steps):
        ids = ids + [int(model.full_logits(torch.tensor([ids]))[0, -1].argmax())]
        if ids[-1] == eod:
            break
    return ids


def test_cli_writes_a_directory_transformers_generates_with(tiny_corpus, tmp_path, monkeypatch):
    from megaengine.data import Tokenizer
    from megaengine.tools import export_hf
    _, tokenizer_model = tiny_corpus
    ours = Tokenizer(tokenizer_model)
    config = replace(CONFIGS["llama-gqa"], vocab_size=ours.vocab_size)
    model = build(config)
    # Checkpoints record the tokenizer the run used at the top level of meta.json (the embedded corpus's too).
    ckpt = write_checkpoint(tmp_path / "ckpt", config, {"tokenizer_model": tokenizer_model, "args": {}})
    monkeypatch.setattr(megaengine, "load_model", lambda path, device="cpu": model, raising=False)
    out = str(tmp_path / "hf")
    export_hf.main(["--load", ckpt, "--output", out])
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                       "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "def main(argv):\n\treturn  0\r\n"
    assert theirs(text)["input_ids"] == ours.encode(text)
    # The pipeline's greedy continuation is megaengine's, token for token, stopping at the end of document.
    prompt = "def main("
    expected = greedy(model, ours.encode(prompt), 6, ours.eod)
    generate = transformers.pipeline("text-generation", model=out, device="cpu")
    result = generate(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert result == prompt + ours.decode(expected[len(ours.encode(prompt)):])
    assert len(result) > len(prompt)
    assert hf_tokenizer.hf_tokenizer_model(out, vocab_size=config.vocab_size) == os.path.join(out, "tokenizer.model")


def test_cli_weights_only_in_another_dtype(tmp_path, monkeypatch):
    from megaengine.tools import export_hf
    config = CONFIGS["llama-gqa"]
    model = build(config)
    ckpt = write_checkpoint(tmp_path / "ckpt", config, {"args": {"data_path": ["x"], "tokenizer_model": None}})
    monkeypatch.setattr(megaengine, "load_model", lambda path, device="cpu": model, raising=False)
    out = tmp_path / "hf"
    with pytest.raises(ConfigError, match="records no tokenizer; pass --tokenizer-model PATH"):
        export_hf.main(["--load", ckpt, "--output", str(out)])
    export_hf.main(["--load", ckpt, "--output", str(out), "--dtype", "bfloat16", "--no-tokenizer"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = model.word_embeddings.weight[: config.vocab_size].to(torch.bfloat16)
    assert torch.equal(theirs.model.embed_tokens.weight, expected)


def test_cli_refuses_a_tokenizer_that_is_gone_or_not_the_models(tiny_corpus, tmp_path, monkeypatch):
    from megaengine.tools import export_hf
    config = CONFIGS["llama-gqa"]  # 101 tokens; the tiny corpus's tokenizer has 512
    monkeypatch.setattr(megaengine, "load_model", lambda path, device="cpu": build(config), raising=False)
    gone = write_checkpoint(tmp_path / "gone", config, {"tokenizer_model": str(tmp_path / "deleted.model")})
    with pytest.raises(ConfigError, match="deleted.model no longer exists"):
        export_hf.main(["--load", gone, "--output", str(tmp_path / "out")])
    other = write_checkpoint(tmp_path / "other", config, {"args": {"tokenizer_model": tiny_corpus[1]}})
    with pytest.raises(ConfigError, match="has 512 pieces but the model's vocabulary is 101"):
        export_hf.main(["--load", other, "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_checkpoint_tokenizer_reads_new_and_old_metadata(monkeypatch):
    from megaengine.tools.export_hf import checkpoint_tokenizer
    assert checkpoint_tokenizer({"tokenizer_model": "/new.model", "args": {"tokenizer_model": None}}) == "/new.model"
    assert checkpoint_tokenizer({"args": {"tokenizer_model": "/old.model", "data_path": ["d"]}}) == "/old.model"
    assert checkpoint_tokenizer({"args": {"tokenizer_model": None, "data_path": ["d"]}}) is None
    calls = []
    monkeypatch.setattr("megaengine.data.ensure_default_corpus",
                        lambda cache_dir, vocab_size: calls.append((cache_dir, vocab_size)) or ("p", "/cache/t.model"))
    # Older runs on the embedded corpus recorded no path: the same cache lookup as training finds it.
    embedded = {"args": {"tokenizer_model": None, "data_path": None, "data_cache_dir": "/c", "vocab_size": 512}}
    assert checkpoint_tokenizer(embedded) == "/cache/t.model"
    assert calls == [("/c", 512)]

"""Hugging Face interop: megaengine GPT weights <-> transformers' GPT2LMHeadModel, LlamaForCausalLM and
MixtralForCausalLM.

`to_hf` / `from_hf` map a full single-process state dict (tp=1, pp=1, ep=1) both ways with one table of names
per family, so each direction is the other's inverse. GPT-2 presets (learned positions, LayerNorm, GELU, biases)
become GPT-2, whose Conv1D weights are stored (in, out); RoPE + RMSNorm + SwiGLU models become LLaMA, whose
q/k/v and gate/up projections are the row blocks of megaengine's fused qkv and fc1; the same with an MoE MLP in
every layer becomes Mixtral, written as the Hub's checkpoints are (`block_sparse_moe.gate`, per-expert w1 = gate,
w3 = up, w2 = down: the rows of megaengine's stacked experts), which transformers 4 and 5 both load; transformers
5's own stacked names (`mlp.gate`, `mlp.experts.gate_up_proj`, `down_proj`) are read too. All use the
rotate-half RoPE convention, so no q/k permutation is needed. The vocabulary is stored unpadded on the HF side.

The HF config decides the architecture; everything about training (dropout, sequence length, padding
multiple, backends, seeds) comes from a `base` GPTConfig, so `from_hf(*to_hf(c, s), base=c) == (c, s)`.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import replace

import torch
from torch import nn

from megaengine.models.gpt import GPT, GPTConfig
from megaengine.moe.config import MoEConfig, moe_layer_pattern
from megaengine.parallel import ConfigError

# GPTConfig fields the HF config determines; the rest come from `base` in from_hf.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "vocab_size",
                     "ffn_hidden_size", "kv_channels", "num_query_groups", "position_embedding_type", "rotary_base",
                     "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
                     "untie_embeddings_and_output_weights", "gelu_approximate", "moe")
VOCAB_ROWS = ("word_embeddings.weight", "output_layer.weight")  # padded in megaengine, unpadded in HF
# Buffers some HF checkpoints carry that hold no weights: causal masks and RoPE frequencies.
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
APPROXIMATE_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---- which family a config belongs to ----

def gpt2_blockers(c: GPTConfig) -> list[str]:
    return [msg for ok, msg in (
        (c.position_embedding_type == "learned_absolute", f"--position-embedding-type {c.position_embedding_type}"),
        (c.normalization == "LayerNorm", f"--normalization {c.normalization}"),
        (not c.swiglu, "--swiglu"),
        (c.add_bias_linear, "--disable-bias-linear"),
        (c.num_query_groups == c.num_attention_heads, f"--num-query-groups {c.num_query_groups} (GQA)"),
        (c.kv_channels * c.num_attention_heads == c.hidden_size, f"--kv-channels {c.kv_channels}"),
    ) if not ok]


def llama_blockers(c: GPTConfig) -> list[str]:
    return [msg for ok, msg in (
        (c.position_embedding_type == "rope", f"--position-embedding-type {c.position_embedding_type}"),
        (c.normalization == "RMSNorm", f"--normalization {c.normalization}"),
        (c.swiglu, "no --swiglu (GELU MLP)"),
        # transformers' LlamaConfig insists on it even when head_dim is given.
        (c.hidden_size % c.num_attention_heads == 0,
         f"--hidden-size {c.hidden_size} not divisible by --num-attention-heads {c.num_attention_heads}"),
    ) if not ok]


def mixtral_blockers(c: GPTConfig) -> list[str]:
    return llama_blockers(c) + [msg for ok, msg in (
        (all(moe_layer_pattern(c.num_layers, c.moe.moe_layer_freq)),
         f"--moe-layer-freq {c.moe.moe_layer_freq} (Mixtral has experts in every layer)"),
        (not c.add_bias_linear, "biases"),
    ) if not ok]


def hf_family(config: GPTConfig) -> str:
    """'gpt2', 'llama' or 'mixtral', or ConfigError naming what keeps the config from being any."""
    if config.moe is not None:
        blockers = mixtral_blockers(config)
        if blockers:
            raise ConfigError("this MoE model cannot be exported to Hugging Face: it is not Mixtral (rope, RMSNorm, "
                              f"SwiGLU experts in every layer, no biases; blocked by {', '.join(blockers)}).")
        return "mixtral"
    gpt2, llama = gpt2_blockers(config), llama_blockers(config)
    if not gpt2:
        return "gpt2"
    if not llama:
        return "llama"
    raise ConfigError(
        "this model cannot be exported to Hugging Face: it is neither GPT-2 (learned positions, LayerNorm, GELU, "
        f"biases, no GQA; blocked by {', '.join(gpt2)}) nor LLaMA (--position-embedding-type rope, "
        f"--normalization RMSNorm, --swiglu; blocked by {', '.join(llama)}).")


# ---- the name tables ----

def layer_rules(family: str, c: GPTConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(megaengine suffix, HF suffixes, transpose) for one transformer layer. Several HF names mean the
    megaengine tensor is their concatenation along rows."""
    if family == "gpt2":
        rules = [("input_norm.", ("ln_1.",), False), ("attention.qkv.", ("attn.c_attn.",), True),
                 ("attention.proj.", ("attn.c_proj.",), True), ("post_attention_norm.", ("ln_2.",), False),
                 ("mlp.fc1.", ("mlp.c_fc.",), True), ("mlp.fc2.", ("mlp.c_proj.",), True)]
        params = ("weight", "bias")
    else:
        attn = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")
        rules = [("input_norm.", ("input_layernorm.",), False), ("attention.qkv.", attn, False),
                 ("attention.proj.", ("self_attn.o_proj.",), False),
                 ("post_attention_norm.", ("post_attention_layernorm.",), False)]
        if family == "llama":
            rules += [("mlp.fc1.", ("mlp.gate_proj.", "mlp.up_proj."), False), ("mlp.fc2.", ("mlp.down_proj.",), False)]
        params = ("weight", "bias") if c.add_bias_linear else ("weight",)
    out = []
    for me, hf, transpose in rules:
        if me.endswith("norm."):  # LayerNorm has a bias whatever --disable-bias-linear says; RMSNorm none
            names = ("weight", "bias") if c.normalization == "LayerNorm" else ("weight",)
        else:
            names = params
        out += [(me + p, tuple(h + p for h in hf), transpose and p == "weight") for p in names]
    if family == "mixtral":  # experts stacked in megaengine, one tensor per expert and projection on the Hub
        experts = range(c.moe.num_experts)
        out += [("mlp.router.weight", ("block_sparse_moe.gate.weight",), False),
                ("mlp.experts.fc1", tuple(f"block_sparse_moe.experts.{e}.w{j}.weight" for e in experts for j in (1, 3)),
                 False),
                ("mlp.experts.fc2", tuple(f"block_sparse_moe.experts.{e}.w2.weight" for e in experts), False)]
    return out


def rules(family: str, c: GPTConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(megaengine name, HF names, transpose) for the whole model."""
    if family == "gpt2":
        top = [("word_embeddings.weight", ("transformer.wte.weight",), False),
               ("position_embeddings.weight", ("transformer.wpe.weight",), False),
               ("final_norm.weight", ("transformer.ln_f.weight",), False),
               ("final_norm.bias", ("transformer.ln_f.bias",), False)]
        layer_prefix = "transformer.h."
    else:
        top = [("word_embeddings.weight", ("model.embed_tokens.weight",), False),
               ("final_norm.weight", ("model.norm.weight",), False)]
        layer_prefix = "model.layers."
    if c.untie_embeddings_and_output_weights:
        top.append(("output_layer.weight", ("lm_head.weight",), False))
    for i in range(c.num_layers):
        top += [(f"layers.{i}.{me}", tuple(f"{layer_prefix}{i}.{h}" for h in hf), t)
                for me, hf, t in layer_rules(family, c)]
    return top


def split_sizes(name: str, c: GPTConfig) -> list[int]:
    """The row blocks of a megaengine tensor that several HF tensors make (experts: rows of all experts)."""
    d = c.kv_channels
    if name.endswith("attention.qkv.weight") or name.endswith("attention.qkv.bias"):
        return [c.num_attention_heads * d, c.num_query_groups * d, c.num_query_groups * d]
    if name.endswith("mlp.experts.fc1"):
        return [c.moe.ffn_size(c.ffn_hidden_size)] * 2 * c.moe.num_experts
    if name.endswith("mlp.experts.fc2"):
        return [c.hidden_size] * c.moe.num_experts
    return [c.ffn_hidden_size, c.ffn_hidden_size]  # mlp.fc1: [gate; up]


def expected_shapes(c: GPTConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """The full (tp=1) shape of every megaengine parameter."""
    h, d, ffn = c.hidden_size, c.kv_channels, c.ffn_hidden_size
    qkv, fc1 = (c.num_attention_heads + 2 * c.num_query_groups) * d, (2 if c.swiglu else 1) * ffn
    per_layer = {"input_norm.weight": (h,), "input_norm.bias": (h,), "post_attention_norm.weight": (h,),
                 "post_attention_norm.bias": (h,), "attention.qkv.weight": (qkv, h), "attention.qkv.bias": (qkv,),
                 "attention.proj.weight": (h, c.num_attention_heads * d), "attention.proj.bias": (h,),
                 "mlp.fc1.weight": (fc1, h), "mlp.fc1.bias": (fc1,), "mlp.fc2.weight": (h, ffn), "mlp.fc2.bias": (h,)}
    shapes = {"word_embeddings.weight": (vocab_rows, h), "output_layer.weight": (vocab_rows, h),
              "position_embeddings.weight": (c.max_position_embeddings, h),
              "final_norm.weight": (h,), "final_norm.bias": (h,)}
    if c.moe is not None:
        e, f = c.moe.num_experts, c.moe.ffn_size(ffn)
        per_layer.update({"mlp.router.weight": (e, h), "mlp.experts.fc1": (e, (2 if c.swiglu else 1) * f, h),
                          "mlp.experts.fc2": (e, h, f)})
    shapes.update({f"layers.{i}.{k}": v for i in range(c.num_layers) for k, v in per_layer.items()})
    return shapes


def check_state(state: dict, c: GPTConfig, family: str, what: str) -> None:
    names = {me for me, _, _ in rules(family, c)}
    missing, unexpected = sorted(names - state.keys()), sorted(state.keys() - names)
    if missing or unexpected:
        raise ConfigError(f"{what} is not a full single-process GPT state dict for this config "
                          f"(missing {missing[:4]}, unexpected {unexpected[:4]}); export a model built with tp=1, "
                          "pp=1 (megaengine.load_model gathers any checkpoint layout into one).")
    shapes = expected_shapes(c, state["word_embeddings.weight"].shape[0])
    wrong = [f"{n}: {tuple(state[n].shape)}, expected {shapes[n]}" for n in sorted(names)
             if tuple(state[n].shape) != shapes[n]]
    if wrong or state["word_embeddings.weight"].shape[0] < c.vocab_size:
        raise ConfigError(f"{what} has shapes that do not match the config ({'; '.join(wrong[:3]) or 'vocabulary'}); "
                          "is it a tensor-parallel shard, or from another model?")


# ---- configs ----

def make_hf_config(c: GPTConfig, family: str, dtype: torch.dtype) -> dict:
    common = {"vocab_size": c.vocab_size, "initializer_range": c.init_method_std, "bos_token_id": None,
              "eos_token_id": None, "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
              "dtype": str(dtype).removeprefix("torch.")}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": c.max_position_embeddings, "n_embd": c.hidden_size, "n_layer": c.num_layers,
                "n_head": c.num_attention_heads, "n_inner": c.ffn_hidden_size,
                "activation_function": "gelu_new" if c.gelu_approximate == "tanh" else "gelu",
                "layer_norm_epsilon": c.norm_epsilon, "resid_pdrop": c.hidden_dropout, "embd_pdrop": c.hidden_dropout,
                "attn_pdrop": c.attention_dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    rope = {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_query_groups,
            "head_dim": c.kv_channels, "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.norm_epsilon, "attention_dropout": c.attention_dropout,
            # transformers 5 reads rope_parameters, 4 reads rope_theta: write both.
            "rope_theta": c.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": c.rotary_base}}
    if family == "mixtral":
        m = c.moe
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common, **rope,
                "intermediate_size": m.ffn_size(c.ffn_hidden_size), "num_local_experts": m.num_experts,
                "num_experts_per_tok": m.moe_router_topk, "sliding_window": None, "output_router_logits": False,
                # transformers' load-balancing loss is k times ours (it divides by the tokens, not by k x tokens)
                "router_aux_loss_coef": m.moe_aux_loss_coeff / m.moe_router_topk, "router_jitter_noise": 0.0}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, **rope,
            "intermediate_size": c.ffn_hidden_size, "attention_bias": c.add_bias_linear, "mlp_bias": c.add_bias_linear,
            "pretraining_tp": 1}


def _refuse(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"Hugging Face config {key}={value!r}: {fix}.")


def gpt2_architecture(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    _refuse(act == "gelu" or act in APPROXIMATE_GELUS, "activation_function", act, "megaengine's GPT-2 MLP uses GELU")
    _refuse(hf.get("scale_attn_weights", True), "scale_attn_weights", False, "megaengine scales by 1/sqrt(head_dim)")
    _refuse(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx", True,
            "megaengine has no per-layer attention scaling")
    _refuse(not hf.get("add_cross_attention", False), "add_cross_attention", True, "decoder-only models only")
    h, heads = hf["n_embd"], hf["n_head"]
    return {"num_layers": hf["n_layer"], "hidden_size": h, "num_attention_heads": heads, "moe": None,
            "max_position_embeddings": hf.get("n_positions", 1024), "vocab_size": hf["vocab_size"],
            "ffn_hidden_size": hf.get("n_inner") or 4 * h, "kv_channels": h // heads, "num_query_groups": heads,
            "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
            "norm_epsilon": hf.get("layer_norm_epsilon", 1e-5), "swiglu": False, "add_bias_linear": True,
            "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
            "gelu_approximate": "none" if act == "gelu" else "tanh"}


def llama_architecture(hf: dict) -> dict:
    _refuse(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "megaengine's SwiGLU uses SiLU")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _refuse(kind == "default", "rope_parameters.rope_type", kind, "megaengine implements plain (unscaled) RoPE only")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    _refuse(partial == 1.0, "partial_rotary_factor", partial, "megaengine rotates the whole head")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    _refuse(attn_bias == mlp_bias, "attention_bias", attn_bias,
            f"megaengine has one --disable-bias-linear switch, so it must equal mlp_bias ({mlp_bias})")
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    return {"num_layers": hf["num_hidden_layers"], "hidden_size": h, "num_attention_heads": heads,
            "max_position_embeddings": hf.get("max_position_embeddings", 2048), "vocab_size": hf["vocab_size"],
            "ffn_hidden_size": hf["intermediate_size"], "kv_channels": hf.get("head_dim") or h // heads,
            "num_query_groups": hf.get("num_key_value_heads") or heads, "position_embedding_type": "rope",
            "rotary_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), "normalization": "RMSNorm",
            "norm_epsilon": hf.get("rms_norm_eps", 1e-6), "swiglu": True, "add_bias_linear": attn_bias,
            "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False), "moe": None}


def mixtral_architecture(hf: dict, base: GPTConfig | None) -> dict:
    """LLaMA's attention, norms and RoPE with experts in every layer. The expert sizes come from the HF config;
    the MoE training settings (aux/z-loss coefficients, capacity, dispatcher) and the dense --ffn-hidden-size,
    which no layer of such a model uses, from `base`, so that a round trip gives back the same config."""
    _refuse(hf.get("sliding_window") is None, "sliding_window", hf.get("sliding_window"),
            "megaengine attends over the whole causal context")
    arch = llama_architecture(hf)
    experts, topk, ffn = hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"]
    moe = base.moe if base is not None and base.moe is not None else MoEConfig(num_experts=experts)
    dense_ffn = base.ffn_hidden_size if base is not None else ffn
    every_layer = moe.moe_layer_freq if all(moe_layer_pattern(arch["num_layers"], moe.moe_layer_freq)) else 1
    arch["moe"] = replace(moe, num_experts=experts, moe_router_topk=topk, moe_layer_freq=every_layer,
                          moe_ffn_hidden_size=moe.moe_ffn_hidden_size if moe.ffn_size(dense_ffn) == ffn else ffn)
    arch["ffn_hidden_size"] = dense_ffn
    return arch


# ---- the two directions ----

def to_hf(config: GPTConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config.json dict, HF state dict) for a full single-process megaengine GPT state dict."""
    family = hf_family(config)
    check_state(state, config, family, "the state dict")
    out = {}
    for me, hf_names, transpose in rules(family, config):
        t = state[me].detach().cpu()
        if me in VOCAB_ROWS:
            t = t[: config.vocab_size]
        rows = t.flatten(0, 1) if ".mlp.experts." in me else t  # experts: the rows of all of them
        parts = rows.split(split_sizes(me, config)) if len(hf_names) > 1 else [t]
        for name, p in zip(hf_names, parts):
            # Fresh contiguous storage per tensor: safetensors refuses views that share memory.
            out[name] = (p.t() if transpose else p).clone(memory_format=torch.contiguous_format)
    return make_hf_config(config, family, state["word_embeddings.weight"].dtype), out


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor], base: GPTConfig | None = None
            ) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, full single-process state dict) from a HF GPT-2 or LLaMA config and state dict. The
    architecture comes from `hf_config`; training settings from `base` (GPTConfig defaults when None, with
    seq_length = the HF max positions)."""
    family = hf_config.get("model_type")
    if family not in ("gpt2", "llama", "mixtral"):
        raise ConfigError(f"Hugging Face model_type={family!r} is not supported; megaengine loads gpt2, llama and "
                          "mixtral.")
    arch = (gpt2_architecture(hf_config) if family == "gpt2" else llama_architecture(hf_config) if family == "llama"
            else mixtral_architecture(hf_config, base))
    if base is None:
        base = GPTConfig(seq_length=arch["max_position_embeddings"], max_position_embeddings=arch["max_position_embeddings"])
    config = replace(base, **arch)
    config.validate()
    hf_state = normalise_hf_names(hf_state, family, config)
    state = {}
    for me, hf_names, transpose in rules(family, config):
        missing = [n for n in hf_names if n not in hf_state]
        if missing:
            raise ConfigError(f"Hugging Face state dict lacks {missing[0]} for this {family} config; "
                              "is config.json from another checkpoint?")
        t = torch.cat([hf_state[n] for n in hf_names]) if len(hf_names) > 1 else hf_state[hf_names[0]]
        t = t.t() if transpose else t
        if ".mlp.experts." in me:  # the rows of all experts, stacked again
            t = t.view(config.moe.num_experts, -1, t.shape[-1])
        if me in VOCAB_ROWS:
            padded = t.new_zeros((config.padded_vocab_size(1),) + tuple(t.shape[1:]))
            padded[: t.shape[0]] = t
            t = padded
        state[me] = t.contiguous()
    check_state(state, config, family, "the Hugging Face state dict")
    return config, state


def normalise_hf_names(hf_state: dict, family: str, config: GPTConfig) -> dict:
    """Add the prefix a base model (GPT2Model, LlamaModel) saves without, drop buffers, refuse strangers."""
    prefix = "transformer." if family == "gpt2" else "model."
    out = {}
    for name, t in hf_state.items():
        if name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if not (name.startswith(prefix) or name.startswith("lm_head.")):
            name = prefix + name
        if family == "mixtral":
            out.update(unstack_experts(name, t, config))
        else:
            out[name] = t
    if not config.untie_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)  # some tied checkpoints store the shared tensor twice
    known = {n for _, hf_names, _ in rules(family, config) for n in hf_names}
    unexpected = sorted(out.keys() - known)
    if unexpected:
        raise ConfigError(f"Hugging Face state dict has weights this {family} config does not use: "
                          f"{unexpected[:4]}; is config.json from another checkpoint?")
    return out


def unstack_experts(name: str, t: torch.Tensor, config: GPTConfig) -> dict:
    """transformers 5's stacked Mixtral experts as the Hub's per-expert tensors (other names pass through):
    mlp.gate -> block_sparse_moe.gate; mlp.experts.gate_up_proj (E, 2 ffn, hidden) -> w1 (gate), w3 (up);
    mlp.experts.down_proj (E, hidden, ffn) -> w2."""
    layer, _, rest = name.rpartition(".mlp.")
    if not layer:
        return {name: t}
    if rest == "gate.weight":
        return {f"{layer}.block_sparse_moe.gate.weight": t}
    moe, h = config.moe, config.hidden_size
    f = moe.ffn_size(config.ffn_hidden_size)
    shapes = {"experts.gate_up_proj": (moe.num_experts, 2 * f, h), "experts.down_proj": (moe.num_experts, h, f)}
    if rest not in shapes:
        return {name: t}
    if tuple(t.shape) != shapes[rest]:
        raise ConfigError(f"Hugging Face {name} is {tuple(t.shape)}, expected {shapes[rest]} for this Mixtral config.")
    prefix, out = f"{layer}.block_sparse_moe.experts", {}
    for e, w in enumerate(t):
        if rest == "experts.down_proj":
            out[f"{prefix}.{e}.w2.weight"] = w
        else:
            out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w.chunk(2)
    return out


# ---- files ----

def load_hf_dir(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from a HF model directory: config.json and model.safetensors, a sharded
    model.safetensors.index.json, or the older pytorch_model*.bin equivalents."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--load-hf {path}: no config.json there; point it at a Hugging Face model directory.")
    with open(config_path) as f:
        config = json.load(f)
    files = weight_files(path)
    state = {}
    for file in files:
        state.update(read_weights(file))
    return config, state


def weight_files(path: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if found:
        return found
    raise ConfigError(f"--load-hf {path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")


def read_weights(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        return _safetensors().load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def load_hf(path: str, base: GPTConfig | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """from_hf on a directory: what `--load-hf DIR` needs."""
    return from_hf(*load_hf_dir(path), base=base)


def export(model_or_state: nn.Module | dict, config: GPTConfig | None, output_dir: str, *,
           dtype: torch.dtype | None = None, tokenizer_model: str | None = None) -> list[str]:
    """Write config.json and model.safetensors that transformers' AutoModelForCausalLM.from_pretrained(output_dir)
    loads, plus, given the run's sentencepiece `tokenizer_model`, the tokenizer files AutoTokenizer loads
    (megaengine.tools.hf_tokenizer) and a generation_config.json that stops at the end-of-document id.
    Returns the paths written."""
    if isinstance(model_or_state, GPT):
        check_whole_model(model_or_state)
        config = config or model_or_state.config
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if config is None:
        raise ConfigError("export: pass the GPTConfig along with a bare state dict.")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    hf_cfg, hf_state = to_hf(config, state)
    paths = []
    if tokenizer_model:  # first: a tokenizer that does not fit the model fails before anything is written
        from megaengine.tools.hf_tokenizer import save_hf_tokenizer, special_ids
        paths += save_hf_tokenizer(tokenizer_model, output_dir, model_max_length=config.max_position_embeddings,
                                   vocab_size=config.vocab_size)
        ids = special_ids(tokenizer_model)
        hf_cfg.update(bos_token_id=ids.get("bos_token_id"), eos_token_id=ids.get("eos_token_id"))
        paths.append(_write_json(os.path.join(output_dir, "generation_config.json"), ids))
    os.makedirs(output_dir, exist_ok=True)
    paths.append(_write_json(os.path.join(output_dir, "config.json"), hf_cfg))
    paths.append(os.path.join(output_dir, "model.safetensors"))
    _safetensors().save_file(hf_state, paths[-1], metadata={"format": "pt"})
    return paths


def _write_json(path: str, content: dict) -> str:
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
    return path


def check_whole_model(model: GPT) -> None:
    ep = 1 if model.ep_group is None else torch.distributed.get_world_size(model.ep_group)
    whole = (model.tp_size == 1 and ep == 1 and model.pre_process and model.post_process
             and model.layer_range == (0, model.config.num_layers))
    if not whole:
        raise ConfigError(f"export needs the whole model in one process (tp=1, pp=1, ep=1); this one holds layers "
                          f"{model.layer_range} at tp={model.tp_size}, ep={ep}. Load it with "
                          "megaengine.load_model(CKPT).")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("Hugging Face interop needs safetensors: pip install safetensors") from None
    return safetensors.torch

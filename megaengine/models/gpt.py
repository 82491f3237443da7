"""GPT built from tensor-parallel layers: GPT-2 by default, LLaMA-style with RoPE, RMSNorm, SwiGLU and GQA.

A `GPT` holds one contiguous range of transformer layers, with the embedding when it is the first pipeline
stage and the final norm and output layer when it is the last, so a pipeline stage is just a GPT built with
`layers=(start, end)`. Activations are (seq, batch, hidden) between layers, sequence-sharded over tp when
sequence parallel. With a context-parallel group a rank holds its share of every sequence (context_parallel.
layout): positions follow that share and attention runs over the whole sequence across the group. Every
weight comes from generators seeded by its name and row block (tensor_parallel/init.py), and each rank draws
only its shard: the same model comes out at any tp, pp or cp.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaengine.context_parallel import (ContextParallel, check_context_parallel, context_parallel_attention,
                                         position_ids)
from megaengine.fp8.config import FP8Config
from megaengine.models import recompute
from megaengine.models.recompute import RecomputeConfig
from megaengine.moe.config import MoEConfig, check_moe, moe_layer_pattern, moe_mlp_parameters
from megaengine.parallel import ConfigError, comm
from megaengine.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                        pad_vocab_size, replicated_param, tp_rng, vocab_parallel_cross_entropy)
from megaengine.parallel.params import mark_tensor_parallel, param_info, set_param_info
from megaengine.tensor_parallel.layers import resolve_group, seeded_init
from megaengine.tensor_parallel.sequence_linear import gathered_linear


@dataclass(frozen=True)
class GPTConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    seq_length: int = 64
    max_position_embeddings: int | None = None  # defaults to seq_length
    vocab_size: int = 4096  # the tokenizer's; padded for tp below
    ffn_hidden_size: int | None = None  # defaults to 4 x hidden
    kv_channels: int | None = None  # defaults to hidden / heads
    num_query_groups: int | None = None  # GQA; defaults to heads (plain multi-head attention)
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    gelu_approximate: str = "none"  # "tanh": GPT-2's original GELU (Megatron's --openai-gelu, HF's gelu_new)
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    sequence_parallel: bool = False
    attention_backend: str = "auto"  # auto (timed choice on CUDA, sdpa on CPU), sdpa, torch, triton
    normalization_backend: str = "auto"  # auto (timed choice on CUDA, torch on CPU), torch, triton, cuda
    init_seed: int = 1234
    fp8: FP8Config | None = None  # FP8 matmuls in the transformer layers' linears (megaengine.fp8); None: off
    moe: MoEConfig | None = None  # Mixture of Experts MLPs (megaengine.moe); None: a dense model
    recompute: RecomputeConfig = RecomputeConfig()  # activation recomputation (models/recompute.py); default off
    extra: dict = field(default_factory=dict)  # preset keys kept for the record (name, notes)

    def __post_init__(self):  # fill the derived defaults once; the config is frozen after this
        derived = {"max_position_embeddings": self.max_position_embeddings or self.seq_length,
                   "ffn_hidden_size": self.ffn_hidden_size or 4 * self.hidden_size,
                   "num_query_groups": self.num_query_groups or self.num_attention_heads}
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads == 0:
            derived["kv_channels"] = self.hidden_size // self.num_attention_heads
        if isinstance(self.recompute, dict):  # to_dict() writes the nested config as a dict
            derived["recompute"] = RecomputeConfig(**self.recompute)
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if isinstance(d.get("fp8"), dict):  # to_dict (asdict) writes the nested configs as dicts
            d["fp8"] = FP8Config(**d["fp8"])
        if isinstance(d.get("moe"), dict):
            d["moe"] = MoEConfig.from_dict(d["moe"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, tp: int = 1) -> None:
        """Raise ConfigError naming the flag for a shape that cannot be built or sharded over tp."""
        h, heads, groups = self.hidden_size, self.num_attention_heads, self.num_query_groups
        checks = [
            (h % heads == 0 or self.kv_channels, "--hidden-size", h,
             f"must be divisible by --num-attention-heads ({heads}), or set --kv-channels"),
            (heads % tp == 0, "--num-attention-heads", heads, f"must be divisible by tensor-parallel size {tp}"),
            (groups % tp == 0, "--num-query-groups", groups, f"must be divisible by tensor-parallel size {tp}"),
            (heads % groups == 0, "--num-query-groups", groups, f"must divide --num-attention-heads ({heads})"),
            (self.ffn_hidden_size % tp == 0, "--ffn-hidden-size", self.ffn_hidden_size,
             f"must be divisible by tensor-parallel size {tp}"),
            (self.seq_length <= self.max_position_embeddings, "--seq-length", self.seq_length,
             f"exceeds --max-position-embeddings ({self.max_position_embeddings}); raise it or shorten the sequence"),
            (not self.sequence_parallel or self.seq_length % tp == 0, "--seq-length", self.seq_length,
             f"must be divisible by tensor-parallel size {tp} with --sequence-parallel"),
            (self.position_embedding_type in ("learned_absolute", "rope"), "--position-embedding-type",
             self.position_embedding_type, "choose learned_absolute or rope"),
            (self.normalization in ("LayerNorm", "RMSNorm"), "--normalization", self.normalization,
             "choose LayerNorm or RMSNorm"),
            (self.attention_backend in ("auto", "sdpa", "torch", "triton"), "--attention-backend",
             self.attention_backend, "choose auto, sdpa, torch or triton"),
            (self.normalization_backend in ("auto", "torch", "triton", "cuda"), "--normalization-backend",
             self.normalization_backend, "choose auto, torch, triton or cuda"),
        ]
        checks += self.recompute.checks(self.num_layers)
        for ok, flag, value, fix in checks:
            if not ok:
                raise ConfigError(f"{flag}={value} {fix}.")
        if self.moe is not None:  # the layout's part (ep against dp) is checked where the layout is known
            check_moe(self.moe, num_layers=self.num_layers, tp=tp, sequence_parallel=self.sequence_parallel,
                      add_bias_linear=self.add_bias_linear)
        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", h), ("--seq-length", self.seq_length),
                            ("--num-attention-heads", heads)):
            if value < 1:
                raise ConfigError(f"{flag}={value} must be >= 1.")

    def padded_vocab_size(self, tp: int) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def is_moe_layer(self, layer_number: int) -> bool:
        return self.moe is not None and moe_layer_pattern(self.num_layers, self.moe.moe_layer_freq)[layer_number]


class Norm(nn.Module):
    """LayerNorm or RMSNorm with replicated weights; on sequence shards their gradients are summed over tp."""

    def __init__(self, config: GPTConfig, hidden: int, group):
        super().__init__()
        self.kind, self.eps, self.group = config.normalization, config.norm_epsilon, group
        self.sequence_parallel, self.backend = config.sequence_parallel, config.normalization_backend
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if self.kind == "LayerNorm" else None

    def forward(self, x):
        w = replicated_param(self.weight, self.group, self.sequence_parallel)
        if self.backend == "auto" and x.is_cuda:  # the fastest correct implementation, timed once per shape
            from megaengine.kernels import select
            b = None if self.bias is None else replicated_param(self.bias, self.group, self.sequence_parallel)
            return select.norm(self.kind, x, w, b, self.eps)
        if self.kind == "RMSNorm":
            if self.backend in ("auto", "torch") and not x.is_cuda:
                return rms_norm_torch(x, w, self.eps)
            from megaengine.kernels import rms_norm
            return rms_norm(x, w, self.eps, backend=_kernel_backend(self.backend))
        b = replicated_param(self.bias, self.group, self.sequence_parallel)
        if self.backend in ("auto", "torch") and not x.is_cuda:
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        from megaengine.kernels import layer_norm
        return layer_norm(x, w, b, self.eps, backend=_kernel_backend(self.backend))


def _kernel_backend(name: str):
    return None if name == "auto" else name


def rms_norm_torch(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotary_tables(seq: int, dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (batch, heads, seq, dim). Rotate-half convention (GPT-NeoX, LLaMA in Hugging Face, Megatron)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_name: str, group):
        super().__init__()
        tp = dist.get_world_size(group)
        self.config, self.group = config, group
        d, heads, groups = config.kv_channels, config.num_attention_heads, config.num_query_groups
        self.head_dim, self.heads_local, self.groups_local = d, heads // tp, groups // tp
        std, out_std = config.init_method_std, config.init_method_std / math.sqrt(2 * config.num_layers)
        sp, bias, seed = config.sequence_parallel, config.add_bias_linear, config.init_seed
        # The fused projection holds [q; k; v] in the output dim; each part is split over tp separately.
        self.qkv = ColumnParallelLinear(
            config.hidden_size, (heads + 2 * groups) * d, bias=bias, sequence_parallel=sp, group=group,
            segments=(heads * d, groups * d, groups * d), init_method=seeded_init(seed, f"{layer_name}.qkv", std),
            fp8=config.fp8)
        self.proj = RowParallelLinear(heads * d, config.hidden_size, bias=bias, sequence_parallel=sp, group=group,
                                      init_method=seeded_init(seed, f"{layer_name}.proj", out_std), fp8=config.fp8)

    def forward(self, x, rope=None, cp=None):
        tokens = None if cp is None else cp.group  # FP8 scales are those of the whole sequence
        qkv = self.qkv(x, tokens)  # (s, b, local q+k+v)
        s, b = qkv.shape[:2]
        d, hq, hk = self.head_dim, self.heads_local, self.groups_local
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = (t.reshape(s, b, -1, d).permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s, d)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        selective = self.config.recompute.selective and self.training
        out = recompute.checkpoint_if(selective, self.core_attention, q, k, v, cp)  # (b, hq, s, d)
        out = out.permute(2, 0, 1, 3).reshape(s, b, hq * d)
        return self.proj(out, tokens)

    def core_attention(self, q, k, v, cp=None):
        backend = self.config.attention_backend
        if cp is not None:  # GQA is handled inside; no attention dropout (checked up front)
            return context_parallel_attention(q, k, v, cp.group, causal=True, comm_type=cp.comm_type,
                                              backend=None if backend == "auto" else backend)
        p = self.config.attention_dropout if self.training else 0.0
        if backend == "triton":
            if p > 0.0:
                raise ValueError("--attention-backend triton has no attention dropout; set --attention-dropout 0")
            from megaengine.kernels import flash_attention
            return flash_attention(q, k, v, causal=True, backend="triton")
        if backend == "auto" and q.is_cuda:  # the fastest correct implementation, timed once per shape
            from megaengine.kernels import select
            with tp_rng():
                return select.attention(q, k, v, p)
        if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves heads/groups query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with tp_rng():  # attention dropout acts on this rank's heads: a stream of its own
            if backend == "torch":
                return attention_torch(q, k, v, p)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


def attention_torch(q, k, v, dropout_p: float):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return F.dropout(probs, dropout_p) @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, layer_name: str, group):
        super().__init__()
        std, out_std = config.init_method_std, config.init_method_std / math.sqrt(2 * config.num_layers)
        ffn, sp, bias, seed = config.ffn_hidden_size, config.sequence_parallel, config.add_bias_linear, config.init_seed
        self.swiglu, self.gelu_approximate = config.swiglu, config.gelu_approximate
        # SwiGLU stacks [gate; up] in one projection, each half split over tp separately.
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * ffn if self.swiglu else ffn, bias=bias, sequence_parallel=sp, group=group,
            segments=(ffn, ffn) if self.swiglu else None, init_method=seeded_init(seed, f"{layer_name}.fc1", std),
            fp8=config.fp8)
        self.fc2 = RowParallelLinear(ffn, config.hidden_size, bias=bias, sequence_parallel=sp, group=group,
                                     init_method=seeded_init(seed, f"{layer_name}.fc2", out_std), fp8=config.fp8)

    def forward(self, x, cp=None):
        tokens = None if cp is None else cp.group  # FP8 scales are those of the whole sequence
        h = self.fc1(x, tokens)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.fc2(h, tokens)


class TransformerLayer(nn.Module):
    """`ep_group`: the expert-parallel group of an MoE layer's experts (None: this rank holds them all)."""

    def __init__(self, config: GPTConfig, layer_number: int, group, ep_group=None):
        super().__init__()
        name = f"layers.{layer_number}"
        self.config = config
        self.input_norm = Norm(config, config.hidden_size, group)
        self.attention = Attention(config, f"{name}.attention", group)
        self.post_attention_norm = Norm(config, config.hidden_size, group)
        if config.is_moe_layer(layer_number):
            from megaengine.moe.layer import MoEMLP  # here, not at the top: its grouped GEMM imports Triton
            self.mlp = MoEMLP(config, config.moe, f"{name}.mlp", group, ep_group)
        else:
            self.mlp = MLP(config, f"{name}.mlp", group)

    def forward(self, x, rope=None, cp=None):
        x = x + self._dropout(self.attention(self.input_norm(x), rope, cp))
        return x + self._dropout(self.mlp(self.post_attention_norm(x), cp))

    def _dropout(self, x):
        p = self.config.hidden_dropout if self.training else 0.0
        if p == 0.0:
            return x
        if self.config.sequence_parallel:  # each rank holds other tokens: masks must differ
            with tp_rng():
                return F.dropout(x, p)
        return F.dropout(x, p)


class GPT(nn.Module):
    """Layers [start, end) of a GPT; `pre_process`: holds the embedding; `post_process`: the head and loss.

    forward(x, labels=None): x is token ids (batch, seq) on the first stage, else the (seq, batch, hidden)
    activation from the previous stage. On the last stage it returns the per-token loss (batch, seq) when
    labels are given, else vocab-sharded logits (seq, batch, vocab/tp); elsewhere the activation.

    `cp_group` (context parallel): x and labels are this rank's share of each sequence (context_parallel.
    split_for_rank), and so is the loss; `cp_comm_type` "p2p" (ring) or "a2a" (all-to-all) moves K/V.
    """

    def __init__(self, config: GPTConfig, tp_group=None, *, cp_group=None, cp_comm_type: str = "p2p",
                 layers: tuple[int, int] | None = None, pre_process: bool = True, post_process: bool = True,
                 ep_group=None):
        super().__init__()
        group = resolve_group(tp_group)
        self.config, self.tp_group, self.ep_group = config, group, ep_group
        self.tp_size = dist.get_world_size(group)
        config.validate(self.tp_size)
        cp = 1 if cp_group is None else dist.get_world_size(cp_group)
        check_context_parallel(cp, cp_comm_type, seq_length=config.seq_length, tp=self.tp_size,
                               sequence_parallel=config.sequence_parallel,
                               num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
                               attention_dropout=config.attention_dropout, attention_backend=config.attention_backend)
        self.cp = ContextParallel(cp_group, cp_comm_type) if cp > 1 else None
        if cp > 1 and config.moe is not None:
            raise ConfigError("MoE layers (--num-experts) do not support context parallelism yet; build the model "
                              "without a cp group.")
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layers or (0, config.num_layers)
        self.layer_range = (start, end)
        self.vocab_size = config.padded_vocab_size(self.tp_size)
        std, sp, seed = config.init_method_std, config.sequence_parallel, config.init_seed
        h = config.hidden_size

        if pre_process:
            # With learned positions the word embedding is summed whole, positions added, then sequence
            # sharded (as Megatron does); with RoPE it is reduce-scattered directly.
            self.word_embeddings = VocabParallelEmbedding(
                self.vocab_size, h, group, sequence_parallel=sp and not self.learned_positions,
                init_method=seeded_init(seed, "word_embeddings", std, config.vocab_size))
            set_param_info(self.word_embeddings.weight, tp_unpadded=config.vocab_size)
            if not post_process and not config.untie_embeddings_and_output_weights:
                set_param_info(self.word_embeddings.weight, tied="embedding")  # its twin lives on the last stage
            if self.learned_positions:
                positions = nn.Embedding(config.max_position_embeddings, h)
                seeded_init(seed, "position_embeddings", std)(positions.weight.data)
                self.position_embeddings = positions  # attached once initialised (zero_init shards it here)
        self.layers = nn.ModuleList(TransformerLayer(config, i, group, ep_group) for i in range(start, end))
        if post_process:
            self.final_norm = Norm(config, h, group)
            if config.untie_embeddings_and_output_weights:
                self.output_layer = ColumnParallelLinear(h, self.vocab_size, bias=False, sequence_parallel=sp,
                                                         group=group, init_method=seeded_init(seed, "output_layer", std, config.vocab_size))
                set_param_info(self.output_layer.weight, tp_unpadded=config.vocab_size)
            elif not pre_process:
                # Tied weights on another stage: a second copy of the word embedding, initialised equal and kept
                # equal by summing both copies' gradients over the embedding group.
                per_rank, r = self.vocab_size // self.tp_size, dist.get_rank(group)
                init = seeded_init(seed, "word_embeddings", std, config.vocab_size)
                rows = [(r * per_rank, (r + 1) * per_rank)]
                self.output_weight = nn.Parameter(init.piece((self.vocab_size, h), rows))
                mark_tensor_parallel(self.output_weight, 0, unpadded=config.vocab_size)
                set_param_info(self.output_weight, tied="copy")

    def global_name(self, name: str) -> str:
        """The name a parameter of this stage has in the whole model: `layers.{i}` counts from this
        stage's first layer, and the last stage's copy of tied embeddings is the word embedding."""
        if name.startswith("layers."):
            i, rest = name[len("layers."):].split(".", 1)
            return f"layers.{self.layer_range[0] + int(i)}.{rest}"
        return "word_embeddings.weight" if name == "output_weight" else name

    @torch.no_grad()
    def load_full_state(self, full: dict) -> None:
        """Fill this stage's shards from a whole-model state dict (tp=1 names and shapes): each parameter takes
        its slice; vocabulary rows are re-padded with zeros to this layout's padded size."""
        from megaengine.tensor_parallel.layers import take_shard
        rank = dist.get_rank(self.tp_group)
        for name, p in self.named_parameters():
            key = self.global_name(name)
            if key not in full:
                raise ConfigError(f"the weights to load have no {key!r} (needed by this model's {name!r}).")
            w = full[key]
            if key in ("word_embeddings.weight", "output_layer.weight"):
                w = w[: self.config.vocab_size]
                w = torch.cat([w, w.new_zeros(self.vocab_size - w.shape[0], w.shape[1])])
            w = take_shard(w, p, rank, self.tp_size)
            ep_dim = param_info(p).ep_dim
            if ep_dim is not None:  # all experts stacked: this rank's block of them
                n = p.shape[ep_dim]
                w = w.narrow(ep_dim, (0 if self.ep_group is None else dist.get_rank(self.ep_group)) * n, n)
            if w.shape != p.shape:
                raise ConfigError(f"weights for {key!r} have shape {tuple(w.shape)} on this rank; the model expects "
                                  f"{tuple(p.shape)}.")
            p.copy_(w)

    @property
    def learned_positions(self) -> bool:
        return self.config.position_embedding_type == "learned_absolute"

    def head_weight(self) -> torch.Tensor:
        if self.config.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.word_embeddings.weight if self.pre_process else self.output_weight

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ids = ids.t()  # (seq, batch)
        x = self.word_embeddings(ids)
        if self.learned_positions:
            x = x + self.position_embeddings(positions).unsqueeze(1)
            if self.config.sequence_parallel:
                # A clone: the shard is a view, which would keep the whole sequence alive for backward
                # (Megatron's clone_scatter_output_in_embedding).
                x = comm.scatter_sequence(x, self.tp_group, dim=0).clone()
        p = self.config.hidden_dropout if self.training else 0.0
        if p == 0.0:
            return x
        if self.config.sequence_parallel:
            with tp_rng():
                return F.dropout(x, p)
        return F.dropout(x, p)

    @staticmethod
    def positions(seq: int, device, cp: ContextParallel | None) -> torch.Tensor:
        """Where this rank's `seq` tokens sit in the sequence: 0..seq-1, or its share of cp x seq tokens."""
        if cp is None:
            return torch.arange(seq, device=device)
        return position_ids(seq * cp.size, cp.size, cp.rank, device)

    def rope(self, positions: torch.Tensor, seq: int):
        """(cos, sin) rows of `positions` in a sequence of `seq` tokens."""
        if self.config.position_embedding_type != "rope":
            return None
        cos, sin = rotary_tables(seq, self.config.kv_channels, self.config.rotary_base, positions.device)
        return cos[positions], sin[positions]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *,
                whole_sequence: bool = False) -> torch.Tensor:
        """`whole_sequence`: x is the whole sequence on every cp rank (sampling), not this rank's share."""
        cp = None if whole_sequence else self.cp
        local = x.shape[1] if self.pre_process else x.shape[0] * (self.tp_size if self.config.sequence_parallel else 1)
        positions = self.positions(local, x.device, cp)
        if self.pre_process:
            x = self.embed(x, positions)
        rope = self.rope(positions, local * (1 if cp is None else cp.size))
        x = recompute.run_layers(self.layers, x, rope, cp, config=self.config.recompute, training=self.training)
        if not self.post_process:
            return x
        x = self.final_norm(x)
        if self.config.untie_embeddings_and_output_weights:
            logits = self.output_layer(x)
        else:
            if self.config.sequence_parallel:
                logits = gathered_linear(x, self.head_weight(), None, self.tp_group)
            else:
                logits = F.linear(comm.copy_to_tp_region(x, self.tp_group), self.head_weight())
        logits = self.mask_padding(logits)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group).t()

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded vocabulary columns get -inf, so the padding (which grows with tp) never enters the softmax
        and every tp layout computes the same loss."""
        local = logits.shape[-1]
        first_pad = self.config.vocab_size - dist.get_rank(self.tp_group) * local
        if first_pad >= local:
            return logits
        pad = torch.arange(local, device=logits.device) >= first_pad
        return logits.masked_fill(pad, float("-inf"))

    @torch.no_grad()
    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq, vocab) logits with the padding columns dropped: for sampling and evaluation."""
        logits = comm.gather_from_tp_region(self.forward(ids, whole_sequence=True), self.tp_group, dim=-1)
        return logits.transpose(0, 1)[..., : self.config.vocab_size]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations (single pipeline stage; see `generate` for pipelines). Every tp rank draws the
        same tokens."""
        was_training = self.training
        self.eval()
        ids = generate(lambda context: self.full_logits(context)[:, -1], ids, new_tokens,
                       seq_length=self.config.seq_length, multiple_of=self.tp_size if self.config.sequence_parallel
                       else 1, temperature=temperature, top_k=top_k, generator=generator)
        self.train(was_training)
        return ids


@torch.no_grad()
def generate(last_logits, ids: torch.Tensor, new_tokens: int, *, seq_length: int, multiple_of: int = 1,
             temperature: float = 0.8, top_k: int = 40, generator: torch.Generator | None = None,
             share=None) -> torch.Tensor:
    """Sample `new_tokens` tokens after `ids` (batch, n), one at a time, with temperature and top-k.

    `last_logits(context)` returns the (batch, vocab) logits of the context's last position, or None on a rank
    that does not hold them (a pipeline stage before the last); `share(token)` then hands every rank the token
    the holder drew. The context is the last `seq_length` tokens, cut to a multiple of `multiple_of` (sequence
    shards must divide evenly).
    """
    for _ in range(new_tokens):
        context = ids[:, -seq_length:]
        context = context[:, context.shape[1] % multiple_of:]
        logits = last_logits(context)
        token = torch.zeros((ids.shape[0], 1), dtype=torch.long, device=ids.device)
        if logits is not None:
            logits = logits.float() / temperature
            top = logits.topk(min(top_k, logits.shape[-1]))
            probs = torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(-1))
            token = torch.multinomial(probs, 1, generator=generator)
        if share is not None:
            share(token)
        ids = torch.cat([ids, token], dim=1)
    return ids


def count_parameters(config: GPTConfig, tp: int = 1) -> dict:
    """Parameter counts of the whole model: `total` (all of them: what memory holds), `matmul` (the weights
    a token's forward multiplies by, the output projection included: what the model-FLOPs formula counts) and
    `active` (total less the experts a token does not visit). With MoE layers, `matmul` and `active` count the
    router and the top-k experts, `total` all experts."""
    h, L, V = config.hidden_size, config.num_layers, config.padded_vocab_size(tp)
    d, heads, groups, ffn = config.kv_channels, config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size
    attn = h * (heads + 2 * groups) * d + heads * d * h
    mlp = h * ffn * (3 if config.swiglu else 2)
    moe_layers = sum(config.is_moe_layer(i) for i in range(L))
    experts = {"total": mlp, "active": mlp}
    if moe_layers:
        experts = moe_mlp_parameters(h, ffn, config.moe, config.swiglu)
    mlps = {kind: (L - moe_layers) * mlp + moe_layers * n for kind, n in experts.items()}
    bias = 0
    if config.add_bias_linear:
        bias = L * ((heads + 2 * groups) * d + h + (2 * ffn if config.swiglu else ffn) + h)
    norms = (2 * L + 1) * h * (2 if config.normalization == "LayerNorm" else 1)
    embed = V * h + (config.max_position_embeddings * h if config.position_embedding_type == "learned_absolute" else 0)
    untied = V * h if config.untie_embeddings_and_output_weights else 0
    total = L * attn + mlps["total"] + bias + norms + embed + untied
    return {"total": total, "matmul": L * attn + mlps["active"] + V * h,
            "active": total - mlps["total"] + mlps["active"]}

"""Activation bytes autograd keeps for backward: per transformer layer, per pipeline stage, per micro-batch.

Derived as Korthikanti et al. (arXiv 2205.05198, section 4) do: walk megaengine's layer (models/gpt.py) op
by op and add up what each op saves for its backward, in bytes, for s tokens x b sequences on one tp rank.
Their result for Megatron's layer, 16-bit activations and 1-byte dropout masks, is sbh(34 + 5as/h):

    attention  11sbh + 5as^2b: QKV input 2, Q and K 4, V 2, softmax output 2as^2b, its dropout mask as^2b and
               output 2as^2b, projection input 2, dropout mask 1
    MLP        19sbh: fc1 input 2, GELU input 8, fc2 input 8, dropout mask 1
    norms      4sbh: the two LayerNorm inputs

and with tensor parallelism t every term but the norms' and the masks' outside the tp region is divided by
t; sequence parallelism divides those too (34sbh/t), selective recomputation drops the 5as^2b, full
recomputation keeps 2sbh (the layer input).

Where megaengine's layer departs from that sum (each is a term in `layer_terms`):
- Flash attention (SDPA's flash/cuDNN/efficient kernels, the Triton kernel) keeps no s x s tensor: it saves
  q, k, v, its output and the fp32 log-sum-exp (a per head per token). Its output is laid out token-major
  (SDPA: (b, s, heads, d); Triton: q's order, which is (s, b, heads, d)), so the projection's (s, b, h)
  input is a view of it, saved once. q, k, v that are views of the fused QKV output keep that whole tensor
  alive; with RoPE q and k are fresh tensors while v still holds the QKV output (+2 sbh over Korthikanti's
  Q, K, V); with GQA, SDPA and the torch path need k and v repeated to every head, and keep the copies.
- SDPA's math fallback (what torch runs on CPU when attention dropout is on) has Korthikanti's structure:
  scaled copies of q and k, a copy of v, softmax output, dropout mask and dropped probabilities, all in
  fp32 on CPU whatever the activation dtype; the projection input is a copy of its output.
- The plain torch attention (--attention-backend torch) also keeps the s x s causal mask (1 byte, per layer).
- Dropout masks only when dropout > 0. On CUDA a mask is 1 byte per element (native_dropout's bool mask);
  on CPU torch multiplies by a float noise tensor, which costs the activation's element size.
- SwiGLU instead of GELU: fc1 output (2f, gate and up), silu output (f) and their product (f, the fc2 input):
  4f per token instead of 2f.
- Norms: the fused kernels (Triton, CUDA: the GPU default) save the input and fp32 statistics (mean and
  rstd, or rstd); torch's LayerNorm on CPU saves them in the activation dtype; the torch RMSNorm keeps an
  fp32 copy of the input, the fp32 rstd and the normalised tensor.
- Sequence parallelism: the column-parallel layers (QKV, fc1, the output layer) save their input's sequence
  shard and gather it again in backward, as Megatron does (tensor_parallel/sequence_linear.py): sbh/t each.
- Biases and residual adds save nothing; the RoPE cos/sin tables are shared by all layers (not counted here).
- Full recomputation keeps the input of each recomputed group (Megatron's uniform method: one per group of
  N layers; block: the first N layers one by one, the rest keep everything).
- An MoE layer's MLP (layers with experts: GPTConfig.is_moe_layer) keeps what plan/moe.py derives (router,
  dispatch indices, the experts' k T routed rows, the combine) instead of the dense MLP's terms, and no fc1
  input: the router's fp32 copy of it is counted there.

Element sizes are explicit: `dtype_bytes` is 4 for fp32 runs, 2 for bf16/fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaengine.plan.moe import moe_terms


@dataclass(frozen=True)
class Kernels:
    """The kernels that run decide what is saved (see the module docstring)."""
    attention: str  # "flash" (SDPA flash/cuDNN/efficient, Triton), "math" (SDPA's fallback), "torch"
    repeat_kv: bool  # GQA: k, v repeated to every head before the kernel (SDPA, torch) or read in place (Triton)
    attention_bytes: int  # element size of what the attention kernel saves (math on CPU: fp32)
    fused_norms: bool  # Triton or CUDA norms
    mask_bytes: int  # bytes per element of a dropout mask
    stat_bytes: int  # bytes per row of a norm statistic (mean, rstd)
    grouped_torch: bool = False  # MoE grouped GEMMs on the torch path (CPU) rather than Triton (CUDA)


def kernels_for(config, device: str, dtype_bytes: int) -> Kernels:
    """What a GPT built from `config` runs on `device` ("cpu" or "cuda"), as models/gpt.py chooses."""
    cuda = device == "cuda"
    backend = config.attention_backend
    if backend == "triton":
        attention = "flash"
    elif backend == "torch":
        attention = "torch"
    else:  # SDPA: torch's CPU flash kernel has no dropout and falls back to the math path
        attention = "flash" if cuda or config.attention_dropout == 0.0 else "math"
    fused = config.normalization_backend in ("triton", "cuda") or (cuda and config.normalization_backend == "auto")
    torch_layernorm_stats = dtype_bytes  # CPU F.layer_norm keeps mean and rstd in the input dtype
    stat = 4 if fused or cuda or config.normalization == "RMSNorm" else torch_layernorm_stats
    return Kernels(attention=attention, repeat_kv=backend != "triton",
                   attention_bytes=4 if attention == "math" else dtype_bytes, fused_norms=fused,
                   mask_bytes=1 if cuda else dtype_bytes, stat_bytes=stat, grouped_torch=not cuda)


def _norm_bytes(config, tokens: float, e: int, k: Kernels) -> float:
    h = config.hidden_size
    stats = 2 if config.normalization == "LayerNorm" else 1
    if k.fused_norms or config.normalization == "LayerNorm":
        return tokens * (h * e + stats * k.stat_bytes)
    return tokens * (h * 4 + 4 + h * e)  # torch RMSNorm: fp32 input copy, fp32 rstd, normalised output


def _qkv_inputs(config, tp: int, e: int, *, own_q: bool, own_k_heads: int, own_v: bool) -> float:
    """Per-token bytes of the q, k, v handed to a kernel: a fresh tensor counts alone (k: `own_k_heads` heads
    of it, 0 when k is a view); any view of the fused QKV output keeps all of that output alive."""
    d, a, g = config.kv_channels, config.num_attention_heads // tp, config.num_query_groups // tp
    views = not (own_q and own_k_heads and own_v)
    return e * d * (own_q * a + own_k_heads + own_v * a + views * (a + 2 * g))


def layer_terms(config, *, seq: int, micro_batch: int, tp: int, dtype_bytes: int, kernels: Kernels,
                selective: bool = False, moe: bool = False, ep: int = 1) -> dict[str, float]:
    """Bytes one transformer layer saves for backward on one tp rank, per micro-batch, by origin; `moe`: its
    MLP is config.moe's, its experts split over `ep` ranks."""
    c, k, e = config, kernels, dtype_bytes
    s, b, h = seq, micro_batch, c.hidden_size
    full, res = s * b, s * b / (tp if c.sequence_parallel else 1)  # tokens: gathered, residual stream
    a, g, d = c.num_attention_heads // tp, c.num_query_groups // tp, c.kv_channels
    gqa, rope = c.num_query_groups != c.num_attention_heads, c.position_embedding_type == "rope"
    p_attn, p_hidden = c.attention_dropout > 0, c.hidden_dropout > 0
    terms = {"norms": 2 * _norm_bytes(c, res, e, k), "column inputs": (1 if moe else 2) * res * h * e}

    if selective:  # the checkpoint keeps the attention core's inputs
        terms["attention core inputs"] = full * _qkv_inputs(c, tp, e, own_q=rope, own_k_heads=rope * g,
                                                              own_v=False)
    elif k.attention == "flash":
        repeat = gqa and k.repeat_kv
        kv_heads = a if repeat else g
        terms["attention q, k, v"] = full * _qkv_inputs(c, tp, e, own_q=rope, own_k_heads=(repeat or rope) * kv_heads,
                                                          own_v=repeat)
        terms["attention output + lse"] = full * a * (d * e + 4)
    else:  # math and torch: the kernels take fresh (scaled, repeated or reshaped) copies of q, k, v
        ea = k.attention_bytes
        mask = ea if k.attention == "math" else k.mask_bytes  # math's CPU dropout noise is fp32 too
        terms["attention q, k, v"] = full * 3 * a * d * ea
        terms["attention s x s"] = full * a * s * (ea + p_attn * (mask + ea))  # softmax; mask, dropped probs
        if k.attention == "torch":
            terms["causal mask"] = s * s
    if selective or k.attention != "flash":  # else a view of the flash output, counted with it
        terms["projection input"] = full * a * d * e
    if moe:  # MoE needs sequence parallelism with tp > 1: the router takes this rank's shard
        terms.update(moe_terms(c, res, ep=ep, dtype_bytes=e, kernels=k))
    else:
        terms["mlp"] = full * c.ffn_hidden_size // tp * e * (4 if c.swiglu else 2)
    if p_hidden:
        terms["dropout masks"] = 2 * res * h * k.mask_bytes
    return terms


def layer_bytes(config, **kw) -> float:
    return sum(layer_terms(config, **kw).values())


def layer_input_bytes(config, *, seq: int, micro_batch: int, tp: int, dtype_bytes: int, kernels=None) -> float:
    """What full recomputation keeps of a group of layers: its input, a residual-stream activation."""
    res = seq * micro_batch / (tp if config.sequence_parallel else 1)
    return res * config.hidden_size * dtype_bytes


def recomputed_groups(num_layers: int, granularity: str | None, method: str | None, n: int | None):
    """(checkpointed groups, layers that keep everything) for one model chunk of `num_layers` layers."""
    if granularity != "full":
        return 0, num_layers
    if method == "uniform":
        return -(-num_layers // n), 0
    return min(n, num_layers), num_layers - min(n, num_layers)


def _per_layer(config, num_layers: int, first_layer: int, ep: int, selective: bool, kw) -> list[float]:
    """layer_bytes of layers first_layer, first_layer + 1, ... (dense or MoE)."""
    return [layer_bytes(config, selective=selective, moe=config.is_moe_layer(first_layer + i), ep=ep, **kw)
            for i in range(num_layers)]


def chunk_layers_bytes(config, num_layers: int, *, first_layer: int = 0, ep: int = 1, **kw) -> float:
    """Bytes the layers of one model chunk (from global layer `first_layer`) keep, under the configured
    recomputation."""
    r = config.recompute
    groups, plain = recomputed_groups(num_layers, r.granularity, r.method, r.num_layers)
    kept = sum(_per_layer(config, num_layers, first_layer, ep, r.selective, kw)[num_layers - plain:])
    return kept + groups * layer_input_bytes(config, **kw)


def recompute_working_bytes(config, num_layers: int, *, first_layer: int = 0, ep: int = 1, **kw) -> float:
    """Bytes a full recomputation materialises at once in backward: one group's layers (the largest), all
    saved tensors."""
    r = config.recompute
    if r.granularity != "full":
        return 0.0
    n = min(r.num_layers, num_layers) if r.method == "uniform" else 1
    return n * max(_per_layer(config, num_layers, first_layer, ep, False, kw), default=0.0)


def embedding_bytes(config, *, seq: int, micro_batch: int, tp: int, dtype_bytes: int, kernels: Kernels) -> float:
    """The first stage: token ids for the lookup (int64; with tp, shifted into this rank's range, plus the
    outside-range mask), the positions, the embedding dropout mask."""
    s, b = seq, micro_batch
    out = s * b * (8 + (tp > 1))
    if config.position_embedding_type == "learned_absolute":
        out += s * 8
    if config.hidden_dropout > 0:
        out += s * b / (tp if config.sequence_parallel else 1) * config.hidden_size * kernels.mask_bytes
    return out


def head_bytes(config, *, seq: int, micro_batch: int, tp: int, dtype_bytes: int, kernels: Kernels) -> float:
    """The last stage: final norm, the output layer's input (its sequence shard with sp), the fp32 softmax of
    the loss and the targets (int64; with tp also the outside-range mask)."""
    s, b, e = seq, micro_batch, dtype_bytes
    res = s * b / (tp if config.sequence_parallel else 1)
    vocab = config.padded_vocab_size(tp) // tp
    out = _norm_bytes(config, res, e, kernels) + res * config.hidden_size * e
    out += s * b * (vocab * 4 + 8 + (tp > 1))
    if config.padded_vocab_size(tp) != config.vocab_size:
        out += vocab  # the padding columns' mask (on the ranks holding padding; counted on all)
    return out


def chunk_bytes(config, num_layers: int, *, first: bool, last: bool, first_layer: int = 0, ep: int = 1,
                **kw) -> float:
    """Bytes one model chunk (a GPT of `num_layers` layers from global layer `first_layer`, with the embedding
    and/or head) keeps per micro-batch; kw: seq, micro_batch, tp, dtype_bytes, kernels."""
    out = chunk_layers_bytes(config, num_layers, first_layer=first_layer, ep=ep, **kw)
    if config.position_embedding_type == "rope" and num_layers:
        out += 2 * kw["seq"] * config.kv_channels * 4  # the fp32 cos and sin tables, shared by the layers
    if first:
        out += embedding_bytes(config, **kw)
    if last:
        out += head_bytes(config, **kw)
    return out

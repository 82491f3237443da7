"""pretrain_gpt.py's command-line flags, with Megatron-LM's names, and the JSON preset underneath them.

`parse_flags(argv)` returns the flags' values and, for each, where it came from: "flag" (the command line),
"preset" (a `--config FILE.json`, whose keys are the flags' dest names) or "default". Resolving these (with
a DeepSpeed JSON) into the run's configuration is megaengine.config's job; nothing below it sees argparse.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os

from megaengine.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print from every rank and exit; we report once, from rank 0
        raise ConfigError(f"{message}. Run with --help for the list of flags.")


class _HelpFormatter(argparse.HelpFormatter):
    """One line of help per flag, and its default once (none for switches that are off and unset values)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or action.option_strings == ["-h", "--help"]:
            return text
        if "default" in text:
            return text
        return f"{text} (default: {default})"


def _positive_int(flag):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {v!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {n}")
        return n
    return parse


def _parallelism_flags(g) -> None:
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="tensor_model_parallel_size",
                   type=_positive_int("--tensor-model-parallel-size"), default=1, help="tensor-parallel group size")
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="pipeline_model_parallel_size",
                   type=_positive_int("--pipeline-model-parallel-size"), default=1, help="number of pipeline stages")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int("--num-layers-per-virtual-pipeline-stage"),
                   help="layers per model chunk for the interleaved schedule (default: one chunk per stage)")
    g.add_argument("--pipeline-schedule", choices=["1f1b", "interleaved", "zb-h1", "gpipe"],
                   help="pipeline schedule (default: 1f1b, or interleaved with virtual stages)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations outside the tensor-parallel layers along the sequence")
    g.add_argument("--zero-config", "--deepspeed-config", dest="zero_config",
                   help="DeepSpeed-style JSON (configs/zero/*.json); keys it leaves out take the flags' values")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks (Megatron's name for ZeRO stage 1)")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True,
                   help="reduce gradients over data parallel during the backward pass")
    g.add_argument("--ddp-bucket-size", type=_positive_int("--ddp-bucket-size"), default=25_000_000,
                   help="elements per gradient-reduction bucket")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"],
                   help="process-group backend (default: nccl with CUDA, else gloo)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="how long a rank waits for a peer before reporting it stuck")


def _context_parallel_flags(g) -> None:
    g.add_argument("--context-parallel-size", "--cp", dest="context_parallel_size",
                   type=_positive_int("--context-parallel-size"), default=1,
                   help="ranks sharing each sequence (long context); the mesh is (dp, pp, cp, tp)")
    g.add_argument("--cp-comm-type", choices=["p2p", "a2a"], default="p2p",
                   help="p2p: ring attention, K/V passed around the cp ranks; a2a: all-to-all (Ulysses), heads "
                        "and query groups divisible by cp x tp")


def _model_flags(g) -> None:
    g.add_argument("--num-layers", type=_positive_int("--num-layers"), help="transformer layers")
    g.add_argument("--hidden-size", type=_positive_int("--hidden-size"), help="model width")
    g.add_argument("--ffn-hidden-size", type=_positive_int("--ffn-hidden-size"), help="MLP width (default: 4 x hidden)")
    g.add_argument("--num-attention-heads", type=_positive_int("--num-attention-heads"), help="query heads")
    g.add_argument("--num-query-groups", type=_positive_int("--num-query-groups"),
                   help="key/value heads for grouped-query attention (default: one per query head)")
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron compatibility")
    g.add_argument("--kv-channels", type=_positive_int("--kv-channels"), help="head dimension (default: hidden / heads)")
    g.add_argument("--seq-length", type=_positive_int("--seq-length"), help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=_positive_int("--max-position-embeddings"),
                   help="learned position table size (default: --seq-length)")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute",
                   help="learned absolute positions (GPT-2) or rotary (LLaMA)")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base frequency")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="norm layers")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of the norm layers")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GELU")
    g.add_argument("--openai-gelu", action="store_true", help="tanh-approximate GELU, as GPT-2 was trained")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output layer instead of the word embedding's transpose")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout of attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight init")
    g.add_argument("--make-vocab-size-divisible-by", type=_positive_int("--make-vocab-size-divisible-by"), default=128,
                   help="pad the vocabulary to a multiple of this times tp")
    g.add_argument("--attention-backend", choices=["auto", "triton", "sdpa", "torch"], default="auto",
                   help="attention kernel: auto picks the fastest correct one for the device")
    g.add_argument("--normalization-backend", choices=["auto", "triton", "cuda", "torch"], default="auto",
                   help="norm kernel: auto picks the fastest correct one for the device")


def _recompute_flags(g) -> None:
    g.add_argument("--recompute-granularity", choices=["full", "selective"],
                   help="selective: the attention core of every layer; full: whole layers (see --recompute-method)")
    g.add_argument("--recompute-method", choices=["uniform", "block"],
                   help="with full: uniform recomputes groups of --recompute-num-layers layers, keeping each group's "
                        "input; block recomputes the first --recompute-num-layers layers of each pipeline chunk")
    g.add_argument("--recompute-num-layers", type=_positive_int("--recompute-num-layers"),
                   help="layers per recomputed group (uniform) or recomputed layers per chunk (block)")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")


def _moe_flags(g) -> None:
    g.add_argument("--num-experts", type=_positive_int("--num-experts"),
                   help="experts per MoE layer: replaces the dense MLP with a Mixture of Experts (default: dense)")
    g.add_argument("--expert-model-parallel-size", "--ep", dest="expert_model_parallel_size",
                   type=_positive_int("--expert-model-parallel-size"), default=1,
                   help="ranks the experts are split over, carved out of the data-parallel ranks")
    g.add_argument("--moe-router-topk", type=_positive_int("--moe-router-topk"), default=2,
                   help="experts each token is routed to (softmax, top k, renormalised)")
    g.add_argument("--moe-ffn-hidden-size", type=_positive_int("--moe-ffn-hidden-size"),
                   help="hidden size of each expert's MLP (default: --ffn-hidden-size)")
    g.add_argument("--moe-layer-freq", type=_layer_freq, default=1,
                   help="every N-th layer is MoE (layer i when i %% N == 0), or a 0/1 list per layer, e.g. [0,1,0,1]")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="weight of the load-balancing loss (Switch/GShard), 0: none")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0, help="weight of the router z-loss (ST-MoE), 0: none")
    g.add_argument("--moe-expert-capacity-factor", type=float,
                   help="tokens an expert takes, as a multiple of its even share; the rest are dropped (default: "
                        "dropless)")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs",
                   help="over capacity, keep an expert's highest-weight assignments or its first tokens")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall",
                   help="how tokens reach the experts on other expert-parallel ranks")


def _layer_freq(v):
    """An int, or a 0/1 list as Megatron writes it ("[1,0,1,0]"); a preset may give either as JSON."""
    if isinstance(v, (int, list)):
        return v
    try:
        parsed = json.loads(v)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"--moe-layer-freq expects an integer or a list like [0,1,0,1], got {v!r}") \
            from None
    if not isinstance(parsed, (int, list)):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq expects an integer or a list like [0,1,0,1], got {v!r}")
    return parsed


def _training_flags(g) -> None:
    g.add_argument("--micro-batch-size", type=_positive_int("--micro-batch-size"), help="samples per rank per forward")
    g.add_argument("--global-batch-size", type=_positive_int("--global-batch-size"), help="samples per optimizer step")
    g.add_argument("--train-iters", type=_positive_int("--train-iters"), help="optimizer steps to train for")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine",
                   help="decay after warmup")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps from 0")
    g.add_argument("--lr-decay-iters", type=int, help="steps over which to decay (default: --train-iters)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip; 0 disables")
    g.add_argument("--seed", type=int, default=1234, help="random seed of weights, data order and dropout")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (fp32 master weights)")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling (fp32 master weights)")
    g.add_argument("--exit-interval", type=_positive_int("--exit-interval"), help="stop after an iteration divisible by this")


def _fp8_flags(g) -> None:
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"],
                   help="FP8 matmuls in the transformer layers' linears (needs --bf16): e4m3 everywhere, or hybrid "
                        "(e4m3 forward, e5m2 gradients) (default: off)")
    g.add_argument("--fp8-recipe", choices=["tensorwise", "rowwise", "delayed"], default="delayed",
                   help="FP8 scaling: per tensor from the current amax, per row, or from an amax history")
    g.add_argument("--fp8-amax-history-len", type=_positive_int("--fp8-amax-history-len"), default=1,
                   help="steps of amax history for --fp8-recipe delayed")
    g.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default="most_recent",
                   help="delayed scaling's amax: the largest in the history or the newest")
    g.add_argument("--fp8-margin", type=int, default=0, help="scale FP8 values down by 2^margin to leave headroom")


def _data_flags(g) -> None:
    g.add_argument("--data-path", nargs="*",
                   help="prefixes of .bin/.idx files, optionally weighted: 0.7 a 0.3 b (default: the embedded corpus)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of the documents")
    g.add_argument("--tokenizer-model", help="sentencepiece model the data was encoded with (needed with --data-path)")
    g.add_argument("--vocab-size", type=_positive_int("--vocab-size"), default=4096,
                   help="vocabulary of the tokenizer built for the embedded corpus")
    g.add_argument("--data-cache-dir", help="where the embedded corpus is built (default: ~/.cache/megaengine)")


def _checkpointing_flags(g) -> None:
    g.add_argument("--save", help="directory to write checkpoints into")
    g.add_argument("--load", help="directory to resume from (default: --save when it holds a checkpoint)")
    g.add_argument("--save-interval", type=_positive_int("--save-interval"), help="save every this many iterations")
    g.add_argument("--save-retain", type=_positive_int("--save-retain"), help="keep only the newest N checkpoints")
    g.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    g.add_argument("--load-hf", help="start from a Hugging Face GPT-2 or LLaMA checkpoint directory")


def _fault_tolerance_flags(g) -> None:
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. SLURM preemption) save a checkpoint and exit cleanly")
    g.add_argument("--max-skipped-steps", type=_positive_int("--max-skipped-steps"), default=10,
                   help="stop after this many consecutive steps skipped for inf/nan gradients")


def _logging_and_evaluation_flags(g) -> None:
    g.add_argument("--log-interval", type=_positive_int("--log-interval"), default=10, help="iterations per progress line")
    g.add_argument("--eval-interval", type=_positive_int("--eval-interval"), default=1000,
                   help="iterations between validation runs")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation run; 0: none")
    g.add_argument("--metrics-file", help="JSON lines of the progress (default: <save>/metrics.jsonl when saving)")
    g.add_argument("--tensorboard-dir", help="also write TensorBoard scalars here")
    g.add_argument("--peak-tflops", type=float, help="per-device peak for MFU when the device is not in our table")
    g.add_argument("--sample-tokens", type=int, default=48, help="tokens of text sampled at the end; 0: none")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain_gpt.py", description="Pretrain a GPT with tensor, pipeline and data parallelism.",
                formatter_class=_HelpFormatter)
    p.add_argument("--config", help="JSON preset (e.g. configs/gpt-tiny.json); flags given here override its values")
    _parallelism_flags(p.add_argument_group("parallelism"))
    _context_parallel_flags(p.add_argument_group("context parallelism"))
    _model_flags(p.add_argument_group("model"))
    _recompute_flags(p.add_argument_group("activation recomputation"))
    _moe_flags(p.add_argument_group("mixture of experts"))
    _training_flags(p.add_argument_group("training"))
    _fp8_flags(p.add_argument_group("fp8"))
    _data_flags(p.add_argument_group("data"))
    _checkpointing_flags(p.add_argument_group("checkpointing"))
    _fault_tolerance_flags(p.add_argument_group("fault tolerance"))
    _logging_and_evaluation_flags(p.add_argument_group("logging and evaluation"))
    return p


def load_preset(path: str, parser: argparse.ArgumentParser) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file.")
    try:
        with open(path) as f:
            preset = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}.") from None
    known = {a.dest for a in parser._actions}
    for key in preset:
        if key.startswith("_"):
            continue  # comments and notes
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}.{hint}")
    return {k: v for k, v in preset.items() if not k.startswith("_")}


def parse_flags(argv=None) -> tuple[dict, dict]:
    """({dest: value}, {dest: "flag" | "preset" | "default"})."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    preset = load_preset(first.config, parser) if first.config else {}
    parser.set_defaults(**preset)
    values = vars(parser.parse_args(argv))
    # Which flags the command line itself gave: the same parse with every default suppressed.
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    on_command_line = set(vars(given.parse_args(argv)))
    origin = {k: "flag" if k in on_command_line else "preset" if k in preset else "default" for k in values}
    return values, origin


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")

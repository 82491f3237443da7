"""Activation bytes per transformer layer, counted with saved-tensor hooks, next to the closed form.

For no / selective / full recomputation, at tp 1, 2 and 4 with and without sequence parallelism, each row
counts the bytes one layer keeps for backward on one tp rank (megaengine.plan.measure: distinct storages,
parameters excluded; a 2-layer minus a 1-layer pipeline chunk) and prints them next to
megaengine.plan.activations (derived for megaengine's layer; its docstring lists where that departs from
Korthikanti et al.'s sbh(34 + 5as/h)) and next to Korthikanti's formulas themselves (16-bit activations,
1-byte masks, Megatron's layer), all in bytes. Two shapes: GPT-2 style with dropout (on CPU, SDPA's math
path keeps the s x s tensors) and LLaMA style without dropout (flash path). Runs on CPU ranks (gloo).

A last table counts what the pipeline frees: each stage's sent outputs (Megatron's deallocate_output_tensor)
in a 1F1B run with pp 2.

    python benchmarks/activation_memory.py [--seq 64] [--micro-batch 2] [--out results/x.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform

import torch

from megaengine.models.recompute import RecomputeConfig
from megaengine.testing import run_distributed

SHAPES = {
    "gpt2 (dropout 0.1)": dict(num_attention_heads=8, hidden_dropout=0.1, attention_dropout=0.1),
    "llama (RoPE, RMSNorm, SwiGLU, GQA 8/4, no dropout)": dict(
        num_attention_heads=8, num_query_groups=4, position_embedding_type="rope", normalization="RMSNorm",
        swiglu=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0),
}
RECOMPUTE = {"none": {}, "selective": dict(recompute=RecomputeConfig("selective")),
             "full": dict(recompute=RecomputeConfig("full", "uniform", 1))}
LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]


def config(shape: dict, recompute: dict, sp: bool, seq: int, hidden: int):
    from megaengine.models import GPTConfig
    return GPTConfig(num_layers=2, hidden_size=hidden, seq_length=seq, vocab_size=256, attention_backend="sdpa",
                     sequence_parallel=sp, **shape, **recompute)


def korthikanti(cfg, tp: int, sp: bool, recompute: str, b: int) -> float:
    """arXiv 2205.05198, Table 2, bytes with 16-bit activations (Megatron's layer, GELU MLP of 4h)."""
    s, h, a = cfg.seq_length, cfg.hidden_size, cfg.num_attention_heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    scores = 0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return sbh * (34 + scores) / tp
    return sbh * (10 + 24 / tp + scores / tp)


def _rank(rank, world, seq, b, hidden, dtype):
    from megaengine import parallel
    from megaengine.plan.activations import chunk_layers_bytes, kernels_for
    from megaengine.plan.measure import layer_saved_bytes
    state = parallel.initialize(tp=world)
    e = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for shape_name, shape in SHAPES.items():
        for tp, sp in LAYOUTS:
            if tp != world:
                continue
            for name, rc in RECOMPUTE.items():
                cfg = config(shape, rc, sp and tp > 1, seq, hidden)
                measured = layer_saved_bytes(cfg, state.tp_group, seq=seq, micro_batch=b, dtype=dtype)
                formula = chunk_layers_bytes(cfg, 1, seq=seq, micro_batch=b, tp=tp, dtype_bytes=e,
                                             kernels=kernels_for(cfg, "cpu", e))
                rows.append((shape_name, tp, sp, name, measured, formula, korthikanti(cfg, tp, sp, name, b)))
    return rows


def measure(seq: int, b: int, hidden: int, dtype) -> list:
    rows = []
    for world in sorted({tp for tp, _ in LAYOUTS}):
        rows += run_distributed(_rank, world, seq, b, hidden, dtype)[0]
    return rows


def _pipeline_rank(rank, world, seq, b, hidden, m):
    from megaengine import parallel
    from megaengine.models import GPT
    from megaengine.pipeline import build, run_pipeline
    state = parallel.initialize(pp=2)
    cfg = dataclasses.replace(config(SHAPES["gpt2 (dropout 0.1)"], {}, False, seq, hidden), num_layers=4)
    r = state.pp_rank
    model = GPT(cfg, state.tp_group, layers=(2 * r, 2 * r + 2), pre_process=r == 0, post_process=r == 1)
    tokens = torch.randint(0, 256, (m, b, seq + 1), generator=torch.Generator().manual_seed(0))

    def step(c, module, x, mb):
        out = module(tokens[mb, :, :-1] if r == 0 else x, tokens[mb, :, 1:] if r == 1 else None)
        return out.mean() / m if r == 1 else out

    stats = {}
    run_pipeline(build("1f1b", 2, m)[r], [model], pp_group=state.pp_group, forward_step=step, num_microbatches=m,
                 tensor_shape=(seq, b, hidden), dtype=torch.float32, device=state.device, stats=stats)
    return stats["freed_bytes"], stats["peak_held"]


def table(rows, dtype_name: str) -> str:
    out = ["| shape | tp | sp | recompute | measured bytes | formula bytes | formula / measured | "
           "Korthikanti (16-bit, Megatron layer) |", "|---|---|---|---|---|---|---|---|"]
    for shape, tp, sp, name, measured, formula, k in rows:
        out.append(f"| {shape} | {tp} | {'yes' if sp else 'no'} | {name} | {measured:,.0f} | {formula:,.0f} | "
                   f"{formula / measured:.4f} | {k:,.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--out", help="also write the tables (markdown) here")
    args = ap.parse_args()
    parts = [f"# Activation bytes per layer, measured vs formula\n\nDate: {datetime.date.today()}; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, CPU (gloo ranks). "
             f"seq {args.seq}, micro-batch {args.micro_batch}, hidden {args.hidden}, 8 heads, one tp rank's "
             "bytes. On CPU a dropout mask costs the activation's element size (float noise), not 1 byte."]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        parts.append(f"\n## {name}\n\n" + table(measure(args.seq, args.micro_batch, args.hidden, dtype), name))
    m = 4
    (freed0, held0), (freed1, _) = run_distributed(_pipeline_rank, 2, args.seq, args.micro_batch, args.hidden, m)
    size = args.seq * args.micro_batch * args.hidden * 4
    parts.append(
        f"\n## Pipeline outputs freed after their send (pp 2, 1F1B, {m} micro-batches, fp32)\n\n"
        f"| stage | output bytes per micro-batch | freed bytes per step | peak micro-batches held | "
        f"saved at the peak |\n|---|---|---|---|---|\n"
        f"| 0 | {size:,} | {freed0:,} | {held0} | {held0 * size:,} |\n| 1 (last: sends no activation) | - | "
        f"{freed1:,} | - | - |")
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

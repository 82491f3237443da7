"""Per-rank memory, communication and step time of ZeRO stages 0-3 next to the ZeRO paper's formulas.

A small GPT (megaengine.models.gpt, bf16) is trained for a few steps at dp=8 on CPU (gloo, forked ranks).
For each stage the table shows the bytes rank 0 holds, counted from its tensors by `memory_report()`, over
the formula (arXiv 1910.02054, with fp32 gradient accumulation: 4 bytes of gradient per parameter), and the
communication volume per step over the theory (2P elements for stages 0-2, 3P for stage 3, times (N-1)/N).

    python benchmarks/zero_memory.py [--dp 8] [--hidden 256] [--layers 4] [--steps 3] [--out results/x.md]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megaengine.parallel import comm
from megaengine.testing import run_distributed

# bytes per parameter (param, grad, optimizer) and the divisor by N at each stage
FORMULA = {0: ((2, 1), (4, 1), (12, 1)), 1: ((2, 1), (4, 1), (12, "N")), 2: ((2, 1), (4, "N"), (12, "N")),
           3: ((2, "N"), (4, "N"), (12, "N"))}


def formula_bytes(stage: int, P: int, N: int) -> list[float]:
    return [b * P / (N if d == "N" else 1) for b, d in FORMULA[stage]]


def _rank(rank, world, stage, cfg, steps):
    from megaengine import parallel
    from megaengine.models.gpt import GPT, GPTConfig
    from megaengine.zero import ZeroOptimizer
    state = parallel.initialize(tp=1, pp=1)
    config = GPTConfig(num_layers=cfg["layers"], hidden_size=cfg["hidden"], num_attention_heads=4,
                       seq_length=cfg["seq"], vocab_size=cfg["vocab"], hidden_dropout=0.0, attention_dropout=0.0)
    model = GPT(config, state.tp_group).to(torch.bfloat16)
    P = sum(p.numel() for p in model.parameters())
    opt = ZeroOptimizer([model], stage=stage, lr=1e-4, weight_decay=0.1, clip_grad=1.0, dp_group=state.dp_group,
                        tp_group=state.tp_group, pp_group=state.pp_group, reduce_bucket_size=cfg["bucket"],
                        param_persistence_threshold=cfg["hidden"], prefetch_bucket_size=cfg["bucket"])
    opt.register_external_parameter(model, model.word_embeddings.weight)  # the tied output layer reads it
    g = torch.Generator().manual_seed(rank)
    times = []
    for i in range(steps + 1):
        tokens = torch.randint(0, config.vocab_size, (1, config.seq_length + 1), generator=g)
        if i == steps:
            comm.comm_stats.reset()
        t = time.perf_counter()
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
        opt.scale_loss(loss).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"P": P, "memory": opt.memory_report(), "step_s": statistics.median(times[1:]),
            "volume": dict(comm.comm_stats.volume), "Q": sum(b.numel for b in opt.buckets)}


def run(dp: int, cfg: dict, steps: int) -> list[dict]:
    rows = []
    for stage in (0, 1, 2, 3):
        r = run_distributed(_rank, dp, stage, cfg, steps, timeout=600)[0]
        rows.append({"stage": stage, **r})
    return rows


def table(rows: list[dict], dp: int) -> str:
    f = (dp - 1) / dp
    lines = ["| stage | params MB (ratio) | grads MB (ratio) | optimizer MB (ratio) | total / ZeRO-paper total | "
             "comm elements / theory | step s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        P, stage = r["P"], r["stage"]
        want = formula_bytes(stage, P, dp)
        got = [r["memory"][k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")]
        paper = {0: 16 * P, 1: 4 * P + 12 * P / dp, 2: 2 * P + 14 * P / dp, 3: 16 * P / dp}[stage]
        v = r["volume"]
        # fp32 gradients, bf16 parameters; the ring all-reduce (stage 0) already counts its two passes
        elements = v.get("reduce_scatter", 0) / 4 + v.get("all_gather", 0) / 2 + (
            v.get("all_reduce", 0) / 4 if stage == 0 else 0)
        theory = (3 if stage == 3 else 2) * P * f
        cells = [f"{g / 2**20:.2f} ({g / w:.3f})" for g, w in zip(got, want)]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {sum(got) / 2**20:.2f} MB / {paper / 2**20:.2f} MB"
                     f" | {elements / theory:.3f} | {r['step_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bucket", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args()
    cfg = {"hidden": a.hidden, "layers": a.layers, "seq": a.seq, "vocab": a.vocab, "bucket": a.bucket}
    rows = run(a.dp, cfg, a.steps)
    head = (f"ZeRO per-rank memory at dp={a.dp}, GPT {a.layers} layers x hidden {a.hidden}, "
            f"P = {rows[0]['P']:,} parameters, bf16 params, fp32 grads and Adam, CPU gloo; ratio = measured / formula "
            "(params 2P, grads 4P, Adam 12P; divided by N from stages 3, 2, 1).\n")
    text = head + "\n" + table(rows, a.dp)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

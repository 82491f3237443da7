"""Training throughput and MFU of megaengine against a plain PyTorch GPT of the same shape, in one process.

    python benchmarks/mfu.py [--layers 24 --hidden 2048 --heads 16 --seq 2048 --batch 8 --vocab 4096]
                             [--iters 12 --warmup 4] [--attention-backend auto] [--normalization-backend auto]
                             [--compile] [--out results.md]

Runs, alternating iteration by iteration (the order reversed every other iteration, so that drift in the
machine's speed and the cost of running first fall on all alike), on the same random token batches:
- megaengine: GPT + ZeroOptimizer (stage 0, clip 1.0) with bf16 weights, as pretrain_gpt.py trains on one GPU;
- megaengine+compile (--compile): the same model and optimizer with each TransformerLayer under torch.compile;
- plain: benchmarks/step_overhead.py's nanoGPT-style GPT (nn.Linear, nn.LayerNorm, SDPA, tied head), fp32
  weights under bf16 autocast, fused AdamW, clip 1.0, eager;
- plain+compile: the same plain model under torch.compile.
Defaults are the 1.3B case (configs/gpt-1.3b.json at micro batch 8, vocab 4096). Prints tokens/s, TFLOP/s and
MFU (6N + 12 L h s FLOPs per token, N the matmul weights, against the device's dense bf16 peak from
megaengine.training.metrics) per run, then the ratios megaengine / plain. On CPU it runs a tiny shape in fp32
and labels every figure a CPU one (MFU n/a).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_overhead import PlainGPT  # noqa: E402

from megaengine import parallel  # noqa: E402
from megaengine.models import GPT, GPTConfig, count_parameters  # noqa: E402
from megaengine.training.metrics import device_peak_tflops, flops_per_token  # noqa: E402
from megaengine.zero.optimizer import ZeroOptimizer  # noqa: E402

GPU_SHAPE = dict(layers=24, hidden=2048, heads=16, seq=2048, batch=8, vocab=4096)
CPU_SHAPE = dict(layers=2, hidden=64, heads=4, seq=32, batch=2, vocab=256)
TARGET_MFU, TARGET_RATIO = 0.60, 1.05  # issue 15: >= 60% MFU and >= 1.05x the compiled plain loop


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in GPU_SHAPE:
        ap.add_argument(f"--{name}", type=int, default=None,
                        help=f"default {GPU_SHAPE[name]} on a GPU, {CPU_SHAPE[name]} on CPU")
    ap.add_argument("--iters", type=int, default=12, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=4, help="untimed iterations per run first")
    ap.add_argument("--attention-backend", default="auto", choices=("auto", "sdpa", "torch", "triton"))
    ap.add_argument("--normalization-backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    ap.add_argument("--compile", action="store_true", help="also run megaengine with torch.compile'd layers")
    ap.add_argument("--no-plain-compile", action="store_true", help="skip the compiled plain run")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use eager)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    shape = GPU_SHAPE if torch.cuda.is_available() else CPU_SHAPE
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def model_config(args) -> GPTConfig:
    return GPTConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                     seq_length=args.seq, vocab_size=args.vocab, hidden_dropout=0.0, attention_dropout=0.0,
                     attention_backend=args.attention_backend, normalization_backend=args.normalization_backend)


def megaengine_steps(config, state, dtype, compile_backend):
    """{name: step(tokens, labels) -> loss} for megaengine, plus its compiled-layers variant when
    compile_backend is given; both train one model with one optimizer."""
    model = GPT(config, state.tp_group).to(device=state.device, dtype=dtype)
    opt = ZeroOptimizer([model], lr=1e-4, weight_decay=0.1, clip_grad=1.0, dp_group=state.dp_group,
                        tp_group=state.tp_group, pp_group=state.pp_group)
    eager_layers = model.layers

    def step(tokens, labels):
        opt.zero_grad()
        opt.set_is_last_microbatch(True)
        loss = model(tokens, labels).float().mean()
        opt.scale_loss(loss).backward()
        opt.step()
        return loss

    def using(layers):
        def run(tokens, labels):
            model.layers = layers
            try:
                return step(tokens, labels)
            finally:
                model.layers = eager_layers
        return run

    steps = {"megaengine": step}
    if compile_backend:
        compiled = nn.ModuleList(torch.compile(layer, backend=compile_backend) for layer in eager_layers)
        steps["megaengine+compile"] = using(compiled)
    return model, steps


def plain_steps(config, vocab, device, compile_backend):
    """{name: step} for the plain GPT, eager and (compile_backend given) compiled; one model, one optimizer."""
    model = PlainGPT(config, vocab).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=device.type == "cuda")

    def make(forward):
        def step(tokens, labels):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
                loss = forward(tokens, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss
        return step

    steps = {"plain": make(model)}
    if compile_backend:
        steps["plain+compile"] = make(torch.compile(model, backend=compile_backend))
    return model, steps


def measure(steps: dict, batches: list, warmup: int, sync, clock=time.perf_counter) -> dict:
    """{name: [seconds per timed iteration]}: every run does each batch, the runs alternating per batch with
    the order reversed every other batch; the first `warmup` batches are not timed."""
    times = {name: [] for name in steps}
    order = list(steps.items())
    for i, (tokens, labels) in enumerate(batches):
        for name, step in (order if i % 2 == 0 else order[::-1]):
            sync()
            start = clock()
            step(tokens, labels)
            sync()
            if i >= warmup:
                times[name].append(clock() - start)
    return times


def summarize(times: dict, tokens_per_step: int, flops_token: float, peak_tflops) -> dict:
    """{name: (tokens/s, TFLOP/s, MFU or None, median step seconds)} from the median step time."""
    rows = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        tokens = tokens_per_step / median
        tflops = tokens * flops_token / 1e12
        rows[name] = (tokens, tflops, tflops / peak_tflops if peak_tflops else None, median)
    return rows


def ratio_lines(rows: dict) -> list[str]:
    """megaengine runs / plain runs in tokens/s, and the issue's targets against the best megaengine run."""
    ours = [n for n in rows if n.startswith("megaengine")]
    theirs = [n for n in rows if n.startswith("plain")]
    lines = [f"- {o} / {t}: {rows[o][0] / rows[t][0]:.3f}x" for o in ours for t in theirs]
    best = max(ours, key=lambda n: rows[n][0])
    mfu = rows[best][2]
    mfu_text = "n/a (no known peak)" if mfu is None else f"{100 * mfu:.1f}% (target >= {100 * TARGET_MFU:.0f}%: " \
                                                            f"{'met' if mfu >= TARGET_MFU else 'not met'})"
    lines.append(f"- best megaengine run: {best}, MFU {mfu_text}")
    if "plain+compile" in rows:
        r = rows[best][0] / rows["plain+compile"][0]
        lines.append(f"- {best} / plain+compile: {r:.3f}x (target >= {TARGET_RATIO}: "
                     f"{'met' if r >= TARGET_RATIO else 'not met'})")
    return lines


def markdown(rows: dict, header: str) -> str:
    table = ["| run | tokens/s | TFLOP/s | MFU | step ms |", "|---|---|---|---|---|"]
    for name, (tokens, tflops, mfu, median) in rows.items():
        mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        table.append(f"| {name} | {tokens:,.0f} | {tflops:.1f} | {mfu_text} | {1000 * median:.1f} |")
    return "\n".join([header, ""] + table + ["", "Ratios (tokens/s):", ""] + ratio_lines(rows) + [""])


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = parallel.initialize()
    device = state.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = model_config(args)
    compile_backend = args.compile_backend
    ours, steps = megaengine_steps(config, state, dtype, compile_backend if args.compile else None)
    _, plain = plain_steps(config, ours.vocab_size, device, None if args.no_plain_compile else compile_backend)
    steps.update(plain)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.iters):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
        batches.append((ids[:, :-1], ids[:, 1:]))
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    times = measure(steps, batches, args.warmup, sync)
    flops_token = flops_per_token(config, count_parameters(config)["matmul"])
    rows = summarize(times, args.batch * args.seq, flops_token, device_peak_tflops() if on_gpu else None)
    where = (f"{torch.cuda.get_device_name()} (peak {device_peak_tflops()} TFLOP/s dense bf16)" if on_gpu
             else f"CPU ({torch.get_num_threads()} threads): CPU figures, fp32, not GPU ones; MFU n/a")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"## Training throughput: megaengine vs plain PyTorch\n\n{date}. {where}. torch {torch.__version__}. "
              f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
              f"vocab {args.vocab}; {flops_token / 1e9:.3g} GFLOP per token; median of {args.iters} iterations "
              f"after {args.warmup}; attention backend {args.attention_backend}, norms {args.normalization_backend}.")
    text = markdown(rows, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    parallel.destroy()
    return rows


if __name__ == "__main__":
    main()

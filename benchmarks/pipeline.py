"""Pipeline schedules on CPU: measured step time and idle time per stage next to the simulator's prediction.

    python benchmarks/pipeline.py [--pp 4] [--microbatches 8] [--hidden 512] [--steps 5]

Runs gpipe, 1f1b, interleaved (2 virtual stages) and zb-h1 on a toy model (Linear + tanh layers) over pp
forked gloo ranks. For each schedule: the step time (slowest rank, after a barrier), the measured bubble
(idle time / (stages x step time), idle = step time - the rank's compute time) and the simulator's bubble for
the same schedule fed with the mean measured F, B, W durations. Honest caveat: with fewer cores than stages
the ranks share cores, so compute times swell while neighbours run (compare the compute column across
schedules: the work is the same) and "idle" includes waiting for a core; p2p latency also counts as idle.
On a 2-core machine `--pp 2` gives the cleaner comparison.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from megaengine import parallel
from megaengine.pipeline import build, layer_ranges, run_pipeline
from megaengine.pipeline.simulate import simulate
from megaengine.testing import run_distributed

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]


def _rank(rank, world, args):
    state = parallel.initialize(tp=1, pp=args.pp)
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(args.hidden, args.hidden), torch.nn.Tanh())
              for _ in range(args.layers)]
    x = torch.randn(args.microbatches, args.batch, args.hidden)
    out = {}
    for name, v in SCHEDULES:
        chunks = [torch.nn.Sequential(*layers[s:e]) for s, e in layer_ranges(args.layers, args.pp, v)[rank]]

        def forward_step(c, module, inp, mb, v=v):
            y = module(x[mb] if inp is None else inp)
            return y.square().mean() / args.microbatches if rank == args.pp - 1 and c == v - 1 else y

        actions = build(name, args.pp, args.microbatches, v)[rank]
        walls, computes, kinds = [], [], {}
        for step in range(args.warmup + args.steps):
            stats = {}
            dist.barrier(group=state.pp_group)
            start = time.perf_counter()
            run_pipeline(actions, chunks, pp_group=state.pp_group, forward_step=forward_step,
                         num_microbatches=args.microbatches, tensor_shape=(args.batch, args.hidden),
                         dtype=torch.float32, device=state.device, timeout=120.0, stats=stats)
            wall = time.perf_counter() - start
            for c in chunks:
                c.zero_grad(set_to_none=True)
            if step < args.warmup:
                continue
            walls.append(wall)
            computes.append(stats["compute_s"])
            for s, e, a in stats["timeline"]:
                kinds.setdefault(a.kind, []).append(e - s)
        out[name] = dict(walls=walls, computes=computes, kinds=kinds, peak=stats["peak_held"])
    return out


def summarize(results, args):
    rows = []
    for name, v in SCHEDULES:
        per_rank = [r[name] for r in results]
        steps = [max(r["walls"][i] for r in per_rank) for i in range(args.steps)]  # slowest rank per step
        i = sorted(range(len(steps)), key=steps.__getitem__)[len(steps) // 2]  # the median step
        step = steps[i]
        idle = [step - r["computes"][i] for r in per_rank]
        measured = sum(idle) / (args.pp * step)
        mean = {k: statistics.fmean(d for r in per_rank for d in r["kinds"].get(k, []))
                for k in ("F", "B", "W", "BW") if any(r["kinds"].get(k) for r in per_rank)}
        cost = {"F": mean["F"], "B": mean.get("B", mean.get("BW", 0.0)), "W": mean.get("W", 0.0)}
        sim = simulate(build(name, args.pp, args.microbatches, v), cost)
        compute = statistics.fmean(r["computes"][i] for r in per_rank)
        rows.append((name if v == 1 else f"{name} v={v}", step * 1e3, sim.makespan * 1e3, compute * 1e3,
                     measured, sim.bubble_fraction, [round(t * 1e3, 1) for t in idle], [r["peak"] for r in per_rank]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128, help="rows per micro-batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    results = run_distributed(_rank, args.pp, args, timeout=600)
    cores = len(os.sched_getaffinity(0))
    print(f"pp={args.pp} microbatches={args.microbatches} layers={args.layers} hidden={args.hidden} "
          f"rows/micro-batch={args.batch}, median of {args.steps} steps, CPU gloo on {cores} cores, "
          f"torch {torch.__version__}")
    header = ("schedule", "step ms", "sim ms", "compute ms/rank", "bubble meas", "bubble sim", "meas/sim",
              "idle ms per stage", "peak held")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, step, sim_step, compute, meas, sim, idle, peak in summarize(results, args):
        ratio = meas / sim if sim else float("nan")
        print(f"| {name} | {step:.1f} | {sim_step:.1f} | {compute:.1f} | {meas:.3f} | {sim:.3f} | {ratio:.2f} "
              f"| {idle} | {peak} |")
    print("sim: the simulator on the same schedule with the mean measured F/B/W durations and no p2p latency.")


if __name__ == "__main__":
    main()

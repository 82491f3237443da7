"""python -m megaengine.plan --config configs/llama-7b.json --world-size 8 --gpu-memory 80 [--json | --search]

Takes pretrain_gpt.py's flags (model, --tp, --pp, --ep, virtual stages, schedule, --zero-config, batch sizes,
recomputation, --bf16) plus the planner's (see --help), and prints the busiest rank's memory and a predicted
step time, or with --search the layouts that fit, fastest first.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from megaengine.errors import ConfigError
from megaengine.plan.layout import from_config, parse
from megaengine.plan.predict import GiB, Hardware, predict_memory, step_time
from megaengine.plan.search import search


def hardware(args, peak_tflops: float | None) -> Hardware:
    return Hardware(gpu_memory_gib=args.gpu_memory, overhead_gib=args.overhead_gib,
                    peak_tflops=peak_tflops or 989.0, mfu=args.mfu, gpus_per_node=args.gpus_per_node,
                    intra_gbs=args.intra_node_bandwidth, inter_gbs=args.inter_node_bandwidth,
                    host_gbs=args.host_bandwidth, device=args.device)


def report(config, layout, memory, time, hw: Hardware) -> dict:
    return {"param_bytes": memory.param_bytes, "expert_param_bytes": memory.expert_param_bytes,
            "grad_bytes": memory.grad_bytes,
            "optimizer_bytes": memory.optimizer_bytes, "optimizer_on_host": memory.optimizer_on_host,
            "activation_bytes_per_microbatch": memory.activation_bytes_per_microbatch,
            "peak_activation_bytes": memory.peak_activation_bytes, "recompute_bytes": memory.recompute_bytes,
            "buffer_bytes": memory.buffer_bytes, "overhead_bytes": memory.overhead_bytes,
            "total_bytes": memory.total_bytes, "gpu_memory_bytes": hw.gpu_memory_gib * GiB,
            "fits": memory.total_bytes <= hw.gpu_memory_gib * GiB, "pipeline_rank": memory.pp_rank,
            "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp, "ep": layout.ep,
                       "virtual": layout.virtual,
                       "schedule": layout.schedule, "zero_stage": layout.zero_stage,
                       "sequence_parallel": config.sequence_parallel, "recompute": config.recompute.describe(),
                       "micro_batch": layout.micro_batch, "microbatches": layout.microbatches},
            "step_seconds": time.step_s, "step_parts": dataclasses.asdict(time),
            "mfu": time.mfu(layout.world, hw.peak_tflops),
            "tokens_per_second": layout.global_batch * config.seq_length / time.step_s}


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def print_report(r: dict, hw: Hardware) -> None:
    lay = r["layout"]
    held = r["peak_activation_bytes"] / r["activation_bytes_per_microbatch"]
    cp = f" cp {lay['cp']}" if lay["cp"] > 1 else ""
    dp = f"dp {lay['dp']}" + (f" (ep {lay['ep']})" if lay["ep"] > 1 else "")
    print(f"layout: tp {lay['tp']} pp {lay['pp']} (virtual {lay['virtual']}, {lay['schedule']}){cp} {dp}, "
          f"ZeRO stage {lay['zero_stage']}, sequence parallel {lay['sequence_parallel']}, recompute "
          f"{lay['recompute']}, {lay['microbatches']} micro-batches of {lay['micro_batch']}")
    print(f"busiest rank: pipeline stage {r['pipeline_rank']}")
    host = " (host memory, not counted)" if r["optimizer_on_host"] else ""
    experts = f" (experts {r['expert_param_bytes'] / GiB:.2f} GiB)" if lay["ep"] > 1 else ""
    rows = [("parameters", r["param_bytes"], experts), ("gradients (fp32)", r["grad_bytes"], ""),
            ("optimizer state", r["optimizer_bytes"], host),
            ("activations / micro-batch", r["activation_bytes_per_microbatch"], ""),
            ("activations at peak", r["peak_activation_bytes"], f" ({held:.2f} micro-batches in flight)"),
            ("recompute working set", r["recompute_bytes"], ""), ("buffers (estimate)", r["buffer_bytes"], ""),
            ("runtime overhead", r["overhead_bytes"], " (--overhead-gib)"), ("total", r["total_bytes"], "")]
    for name, value, note in rows:
        print(f"  {name:28s}{_gib(value)}{note}")
    short = (r["total_bytes"] - r["gpu_memory_bytes"]) / GiB
    verdict = "fits" if r["fits"] else f"does NOT fit (short by {short:.2f} GiB)"
    print(f"  on a {hw.gpu_memory_gib:g} GiB GPU: {verdict}")
    print(f"predicted step {r['step_seconds']:.3f} s, {r['tokens_per_second']:,.0f} tokens/s, MFU {r['mfu']:.1%} "
          f"(assumes {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s on the math)")


def print_search(results, config, world: int, hw: Hardware, top: int) -> None:
    print(f"{len(results)} layouts fit {world} GPUs of {hw.gpu_memory_gib:g} GiB; fastest first (assumptions: "
          f"{hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s on the math, {hw.intra_gbs:g} GB/s within a node of "
          f"{hw.gpus_per_node}, {hw.inter_gbs:g} GB/s across, {hw.overhead_gib:g} GiB overhead per GPU)")
    moe = config.moe is not None  # the ep column only for MoE models
    print("| tp | pp | virtual | schedule | dp |" + " ep |" * moe + " ZeRO | recompute | micro-batch | GiB | step s "
          "| tokens/s | MFU | comm GB/step |")
    print("|---" * (13 + moe) + "|")
    for c in results[:top]:
        lay, t = c.layout, c.time
        tokens = lay.global_batch * config.seq_length / t.step_s
        dp = f"{lay.dp} |" + f" {lay.ep} |" * moe
        print(f"| {lay.tp} | {lay.pp} | {lay.virtual} | {lay.schedule} | {dp} {lay.zero_stage} | {c.recompute} "
              f"| {lay.micro_batch} | {c.memory.total_bytes / GiB:.1f} | {t.step_s:.2f} | {tokens:,.0f} "
              f"| {t.mfu(lay.world, hw.peak_tflops):.1%} | {t.comm_bytes / 1e9:,.1f} |")


def main(argv=None) -> int:
    try:
        cfg, args = parse(argv)
        config, layout = from_config(cfg)
    except ConfigError as e:
        print(f"megaengine.plan: error: {e}", file=sys.stderr)
        return 2
    hw = hardware(args, cfg.logging.peak_tflops)
    if args.search:
        results = search(config, layout, layout.world, hw)
        if args.json:
            print(json.dumps([{"layout": vars(c.layout), "recompute": c.recompute, "total_bytes": c.memory.total_bytes,
                               "step_seconds": c.time.step_s} for c in results[:args.top]]))
        else:
            print_search(results, config, layout.world, hw, args.top)
        return 0
    memory = predict_memory(config, layout, hw)
    r = report(config, layout, memory, step_time(config, layout, hw, memory), hw)
    if args.json:
        print(json.dumps(r))
    else:
        print_report(r, hw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MoE expert compute on a CUDA GPU: one rank's SwiGLU experts as grouped GEMMs, ours against the alternatives.

    python benchmarks/moe.py [--quick] [--out benchmarks/results/moe-<device>.md]

Forward+backward TFLOP/s of the expert MLPs (fc1 hidden -> 2 ffn, SwiGLU, fc2 ffn -> hidden; bf16, Mixtral's
hidden 4096 and ffn 14336) over 16K routed rows (8K tokens x top-2), for 8 local experts (ep 1) and 2 (ep 4),
rows spread evenly or skewed (expert i gets a share proportional to 1/(i+1)). Implementations:
- ours-triton: megaengine.kernels.grouped_gemm's Triton kernels (one launch per GEMM for all experts);
- torch-bmm: the CPU path, every expert padded to the largest group and one batched matmul;
- torch-loop: one F.linear per expert, the Python loop the grouped GEMM replaces;
- torch-grouped-mm: torch._grouped_mm (cuBLAS/CUTLASS grouped GEMM), where this torch and GPU have it.
FLOPs: 2 rows x hidden x 3 ffn per forward (both GEMMs), forward+backward 3x that; padding not counted.

Writes a dated markdown table with the device name. Needs a CUDA GPU: on CPU it says so and exits with 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch
import torch.nn.functional as F

HIDDEN, FFN, ROWS = 4096, 14336, 16384
EXPERTS = (8, 2)
ROUTINGS = ("even", "skewed")


def counts_for(rows: int, experts: int, routing: str) -> torch.Tensor:
    share = torch.ones(experts) if routing == "even" else 1.0 / torch.arange(1, experts + 1)
    counts = (share / share.sum() * rows).floor().long()
    counts[0] += rows - counts.sum()
    return counts


def expert_flops(rows: int, hidden: int, ffn: int) -> float:
    return 3 * 2 * rows * hidden * 3 * ffn


def _torch_grouped_mm(x, w, counts):
    offsets = counts.cumsum(0).to(device=x.device, dtype=torch.int32)
    return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)


def _loop(x, w, counts):
    return torch.cat([F.linear(p, wi) for p, wi in zip(x.split(counts.tolist()), w)])


def runners() -> dict:
    """name: grouped linear (x, weight (groups, out, in), counts) -> (rows, out)."""
    from megaengine.kernels.grouped_gemm import grouped_linear
    table = {"ours-triton": lambda x, w, c: grouped_linear(x, w, c, backend="triton"),
             "torch-bmm": lambda x, w, c: grouped_linear(x, w, c, backend="torch"),
             "torch-loop": _loop}
    if hasattr(torch, "_grouped_mm"):
        table["torch-grouped-mm"] = _torch_grouped_mm
    return table


def time_expert_mlp(linear, experts: int, routing: str, hidden: int, ffn: int, rows: int):
    """Forward+backward TFLOP/s of the SwiGLU experts through `linear`, or an error string."""
    from triton.testing import do_bench
    counts = counts_for(rows, experts, routing).cuda()
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fc1 = (torch.randn(experts, 2 * ffn, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    fc2 = (torch.randn(experts, hidden, ffn, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)

    def step():
        gate, up = linear(x, fc1, counts).chunk(2, dim=-1)
        linear(F.silu(gate) * up, fc2, counts).backward(dy)

    try:
        step()
        torch.cuda.synchronize()
        ms = do_bench(step, warmup=5, rep=30, grad_to_none=[x, fc1, fc2])
    except Exception as error:  # an implementation this torch or GPU refuses is reported, not fatal
        return f"n/a ({str(error).splitlines()[0][:40]})"
    return expert_flops(rows, hidden, ffn) / ms / 1e9


def markdown(header, rows) -> str:
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 experts, even routing, ffn 4096 only")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/moe-<device>.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/moe.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        sys.exit(2)
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    cases = [(8, "even")] if args.quick else [(e, r) for e in EXPERTS for r in ROUTINGS]
    ffn = 4096 if args.quick else FFN
    impls = runners()
    rows = []
    for experts, routing in cases:
        speeds = {name: time_expert_mlp(run, experts, routing, HIDDEN, ffn, ROWS) for name, run in impls.items()}
        ours = speeds["ours-triton"]
        best = max((v for k, v in speeds.items() if k != "ours-triton" and isinstance(v, float)), default=None)
        ratio = f"{ours / best:.2f}" if isinstance(ours, float) and best else "-"
        rows.append([experts, routing, *speeds.values(), ratio])
        print(f"{experts} experts, {routing}: " + ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.1f}'}"
                                                           for k, v in speeds.items()))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"# MoE expert compute on {device}", "",
        f"Date: {date}. torch {torch.__version__}. Produced by `python benchmarks/moe.py"
        f"{' --quick' if args.quick else ''}`.", "",
        f"## SwiGLU experts forward+backward TFLOP/s (bf16, hidden {HIDDEN}, ffn {ffn}, {ROWS} routed rows)", "",
        "FLOPs 3 x 2 rows hidden 3 ffn; the ratio is ours / the best other implementation.", "",
        markdown(["local experts", "routing", *impls, "ours / best other"], rows), ""])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"moe-{slug}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

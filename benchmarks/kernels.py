"""Fused kernels on a CUDA GPU, side by side with what torch ships, as ratios ours / theirs.

    python benchmarks/kernels.py [--quick] [--only attention|norms] [--out benchmarks/results/kernels-<device>.md]

(--only splits the run in two, each well inside ten minutes on an H100, and writes kernels-<device>-<part>.md.)

Attention (bf16, batch x seq = 16K tokens, heads x head_dim = 2048): forward and forward+backward TFLOP/s of
megaengine's Triton flash attention against torch SDPA's flash, memory-efficient and cuDNN backends, at seq
1K-16K, head dim 64 and 128, causal and not. FLOPs: forward 4 b h s^2 d (halved when causal), backward 2.5x
the forward (recomputation not counted), as FlashAttention's benchmarks count them.

LayerNorm and RMSNorm (bf16, 16K rows): forward+backward GB/s of ours (Triton, CUDA extension) against torch
eager, torch.compile and Liger-Kernel (when installed), and of backend "auto" (megaengine.kernels.select),
next to the device-to-device copy bandwidth measured here. Bytes: x read and y written by the forward, x and
dy read and dx written by the backward (10 bytes per element in bf16), weights and statistics not counted.
Then each one's per-call cost: microseconds per forward+backward at NORM_CALL_ROWS rows, where the bytes are
negligible and what is left is launch and host work (the "fixed cost" of issue 15).

Writes a dated markdown table with the device name. Needs a CUDA GPU: on CPU it says so and exits with 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch

SEQS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
TOKENS = 16384
ATTN_HIDDEN = 2048
NORM_ROWS = 16384
NORM_HIDDEN = (1024, 2048, 4096, 8192, 16384, 65536)
NORM_CALL_ROWS = 16


def attention_flops(batch, heads, seq, head_dim, causal, backward):
    fwd = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def norm_bytes(rows, hidden, element_size):
    return 5 * rows * hidden * element_size


def bench_ms(fn, grads=None):
    """Mean milliseconds per call; one untimed call first, so autotuning and compilation stay out."""
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=50, grad_to_none=grads)


def copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def sdpa_runner(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def attention_runners():
    from torch.nn.attention import SDPBackend

    from megaengine.kernels import flash_attention
    return {"ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, backend="triton"),
            "ours-atomic-dq": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, backend="triton",
                                                                      atomic_dq=True),
            "sdpa-flash": sdpa_runner(SDPBackend.FLASH_ATTENTION),
            "sdpa-efficient": sdpa_runner(SDPBackend.EFFICIENT_ATTENTION),
            "sdpa-cudnn": sdpa_runner(SDPBackend.CUDNN_ATTENTION)}


def time_attention(run, seq, head_dim, causal, backward):
    """TFLOP/s, or an error string when this implementation refuses the shape."""
    batch, heads = TOKENS // seq, ATTN_HIDDEN // head_dim
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))
    try:
        if backward:
            do = torch.randn_like(q)
            ms = bench_ms(lambda: run(q, k, v, causal).backward(do), grads=[q, k, v])
        else:
            with torch.no_grad():
                ms = bench_ms(lambda: run(q, k, v, causal))
    except (RuntimeError, ValueError) as error:
        return f"n/a ({str(error).splitlines()[0][:40]})"
    return attention_flops(batch, heads, seq, head_dim, causal, backward) / ms / 1e9


def norm_runners():
    import torch.nn.functional as F

    from megaengine.kernels import layer_norm, rms_norm
    from megaengine.kernels.cuda import unavailable_reason

    def ln_torch(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    def rms_torch(x, w, b):
        return F.rms_norm(x, (x.shape[-1],), w, 1e-6)

    # dynamic=False: one static graph per hidden size, as a training run would have, rather than the dynamic-shape
    # graph torch.compile switches to on the second size it sees.
    runners = {
        "layernorm": {"ours-triton": lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"),
                      "ours-cuda": lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="cuda"),
                      "torch": ln_torch, "torch.compile": torch.compile(ln_torch, dynamic=False)},
        "rmsnorm": {"ours-triton": lambda x, w, b: rms_norm(x, w, 1e-6, backend="triton"),
                    "ours-cuda": lambda x, w, b: rms_norm(x, w, 1e-6, backend="cuda"),
                    "torch": rms_torch, "torch.compile": torch.compile(rms_torch, dynamic=False)},
    }
    reason = unavailable_reason(torch.empty(0, device="cuda"))
    if reason is not None:
        for table in runners.values():
            table["ours-cuda"] = reason
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        runners["layernorm"]["liger"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
        runners["rmsnorm"]["liger"] = lambda x, w, b: LigerRMSNormFunction.apply(x, w, 1e-6)
    except ImportError:
        for table in runners.values():
            table["liger"] = "liger-kernel not installed"
    from megaengine.kernels import select
    runners["layernorm"]["auto"] = lambda x, w, b: select.norm("LayerNorm", x, w, b, 1e-5)
    runners["rmsnorm"]["auto"] = lambda x, w, b: select.norm("RMSNorm", x, w, None, 1e-6)
    return runners


def _norm_ms(run, rows, hidden):
    """Milliseconds per forward+backward, or an error string."""
    if isinstance(run, str):
        return f"n/a ({run[:40]})"
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    try:
        return bench_ms(lambda: run(x, w, b).backward(dy), grads=[x, w, b])
    except Exception as error:  # a backend that cannot build or run is reported, not fatal
        return f"n/a ({str(error).splitlines()[0][:40]})"


def time_norm(run, hidden):
    """Forward+backward GB/s at NORM_ROWS rows, or an error string."""
    ms = _norm_ms(run, NORM_ROWS, hidden)
    return ms if isinstance(ms, str) else norm_bytes(NORM_ROWS, hidden, 2) / ms / 1e6


def time_norm_call(run, hidden):
    """Microseconds per forward+backward at NORM_CALL_ROWS rows (launch and host work), or an error string."""
    ms = _norm_ms(run, NORM_CALL_ROWS, hidden)
    return ms if isinstance(ms, str) else 1e3 * ms


def fmt(value):
    return f"{value:.1f}" if isinstance(value, float) else value


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}" if isinstance(ours, float) and isinstance(theirs, float) else "-"


def attention_table(seqs, head_dims):
    runners = attention_runners()
    others = [name for name in runners if name.startswith("sdpa")]
    head = (["pass", "head_dim", "causal", "seq"] + list(runners) + [f"ours/{n}" for n in others])
    rows, target = [], []
    for backward in (False, True):
        for head_dim in head_dims:
            for causal in (False, True):
                for seq in seqs:
                    got = {name: time_attention(run, seq, head_dim, causal, backward) for name, run in runners.items()}
                    row = ["fwd+bwd" if backward else "fwd", head_dim, causal, seq]
                    row += [fmt(got[n]) for n in runners] + [ratio(got["ours"], got[n]) for n in others]
                    rows.append(row)
                    best = max((got[n] for n in others if isinstance(got[n], float)), default=None)
                    if backward and head_dim == 128 and causal and seq >= 2048 and best is not None:
                        target.append((seq, got["ours"] / best if isinstance(got["ours"], float) else None))
                    print(" | ".join(map(str, row)), flush=True)
    return head, rows, target


def norm_table(hiddens, copy_gbs):
    """(head, rows, issue-5 target cells, {(kernel, hidden): {runner: GB/s or error}})."""
    base = ("ours-triton", "ours-cuda", "torch", "torch.compile")
    runners_by_kernel = norm_runners()
    extra = [n for n in next(iter(runners_by_kernel.values())) if n not in base]  # liger, auto (GPU runs)
    head = (["kernel", "hidden", *base, *extra, "triton/torch", "triton/compile", "cuda/torch", "cuda/compile",
             "triton/copy"] + (["triton/liger"] if "liger" in extra else []))
    rows, target, measured = [], [], {}
    for kernel, runners in runners_by_kernel.items():
        for hidden in hiddens:
            got = measured[(kernel, hidden)] = {name: time_norm(run, hidden) for name, run in runners.items()}
            row = [kernel, hidden] + [fmt(got[n]) for n in (*base, *extra)]
            for name in ("ours-triton", "ours-cuda"):
                if isinstance(got[name], float) and isinstance(got["torch"], float):
                    target.append((kernel, hidden, name, got[name] / copy_gbs, got[name] / got["torch"]))
            row += [ratio(got["ours-triton"], got["torch"]), ratio(got["ours-triton"], got["torch.compile"]),
                    ratio(got["ours-cuda"], got["torch"]), ratio(got["ours-cuda"], got["torch.compile"]),
                    ratio(got["ours-triton"], copy_gbs)]
            row += [ratio(got["ours-triton"], got["liger"])] if "liger" in extra else []
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
    return head, rows, target, measured


def norm_call_table(hidden):
    """(head, rows): microseconds per forward+backward at NORM_CALL_ROWS rows, every runner."""
    runners_by_kernel = norm_runners()
    names = list(next(iter(runners_by_kernel.values())))
    rows = []
    for kernel, runners in runners_by_kernel.items():
        got = {name: time_norm_call(run, hidden) for name, run in runners.items()}
        rows.append([kernel, hidden] + [fmt(got[n]) for n in names])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return ["kernel", "hidden"] + names, rows


def issue15_norm_target(measured, copy_gbs, runner="ours-triton"):
    """Norms fwd+bwd >= 85% of copy bandwidth for hidden >= 2048 and ahead of torch eager and Liger at every
    width measured: which (kernel, hidden) cells meet it."""
    cells, missed = 0, []
    for (kernel, hidden), got in measured.items():
        ours = got.get(runner)
        others = [got[n] for n in ("torch", "liger") if isinstance(got.get(n), float)]
        ok = (isinstance(ours, float) and all(ours > o for o in others)
              and (hidden < 2048 or ours >= 0.85 * copy_gbs))
        cells += 1
        if not ok:
            missed.append(f"{kernel} {hidden} ({fmt_ratio(ours / copy_gbs if isinstance(ours, float) else None)} "
                          f"of copy)")
    return (f"- Norms forward+backward ({runner}) >= 85% of copy for hidden >= 2048 and ahead of torch eager and "
            f"Liger at every width (issue 15): met at {cells - len(missed)} of {cells} cells; missed: "
            + (", ".join(missed) or "none") + ".")


def issue15_attention_target(rows, head, ours_name="ours"):
    """Attention head dim 128, causal and not, every seq: ours / best SDPA backend >= 1.0, forward and
    forward+backward (issue 15)."""
    out = []
    for kind in ("fwd", "fwd+bwd"):
        ratios = []
        for row in rows:
            cells = dict(zip(head, row))
            if cells["pass"] != kind or cells["head_dim"] != 128:
                continue
            theirs = [float(cells[n]) for n in head[4:] if n.startswith("sdpa") and _is_number(cells[n])]
            ours = float(cells[ours_name]) if _is_number(cells[ours_name]) else None
            ratios.append((cells["causal"], cells["seq"], ours / max(theirs) if ours and theirs else None))
        ok = [r for *_, r in ratios if r is not None and r >= 1.0]
        out.append(f"- Attention {kind}, head dim 128, {ours_name} / best SDPA backend >= 1.0 (issue 15): met at "
                   f"{len(ok)} of {len(ratios)} (causal, seq) cells ("
                   + ", ".join(f"{'causal' if c else 'full'} {s}: {fmt_ratio(r)}" for c, s, r in ratios) + ").")
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}"


def markdown(head, rows):
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seq 1K and 4K, head dim 128, hidden 4K and 64K only")
    ap.add_argument("--only", choices=("attention", "norms"), help="run one half of the tables")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/kernels-<device>.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        sys.exit(2)

    import triton
    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    seqs, head_dims, hiddens = ((1024, 4096), (128,), (4096, 65536)) if args.quick else (SEQS, HEAD_DIMS,
                                                                                           NORM_HIDDEN)
    print(f"device: {device}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (bytes read + written)")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [f"# Fused kernels on {device}", "",
                f"Date: {date}. Device: {device}. torch {torch.__version__}, triton {triton.__version__}, "
                f"CUDA {torch.version.cuda}. Produced by `python benchmarks/kernels.py"
                f"{' --quick' if args.quick else ''}{' --only ' + args.only if args.only else ''}`."]
    targets = []
    if args.only in (None, "attention"):
        print("attention TFLOP/s (bf16)")
        *attn, attn_target = attention_table(seqs, head_dims)
        ok = [r for _, r in attn_target if r is not None and r >= 1.0]
        targets.append(f"- Attention forward+backward, head dim 128, causal, seq >= 2K, ours / best SDPA backend >= "
                       f"1.0: met at {len(ok)} of {len(attn_target)} lengths ("
                       + ", ".join(f"{seq}: {fmt_ratio(r)}" for seq, r in attn_target) + ").")
        targets += [line for name in attn[0] if name.startswith("ours") and "/" not in name
                    for line in issue15_attention_target(attn[1], attn[0], name)]
        sections += [
            "", "## Attention TFLOP/s (bf16, batch x seq = 16K tokens, heads x head_dim = 2048)", "",
            "FLOPs: forward 4 b h s^2 d (half when causal); forward+backward 3.5x that. Ratios are ours / theirs.",
            "", markdown(*attn)]
    if args.only in (None, "norms"):
        print("norms forward+backward GB/s (bf16)")
        *norms, norm_target, measured = norm_table(hiddens, copy_gbs)
        call_hidden = 4096
        print(f"norms forward+backward microseconds per call at {NORM_CALL_ROWS} rows (bf16)")
        calls = norm_call_table(call_hidden)
        ok = [t for t in norm_target if t[3] >= 0.8 and t[4] >= 1.5]
        targets.append(f"- Norms forward+backward >= 80% of copy bandwidth and >= 1.5x torch eager: met at {len(ok)} "
                       f"of {len(norm_target)} (kernel, hidden, backend) cells; missed: "
                       + (", ".join(f"{k} {h} {n} ({c:.2f} of copy, {e:.2f}x eager)" for k, h, n, c, e in norm_target
                                    if (k, h, n, c, e) not in ok) or "none") + ".")
        sections += [
            "", "## LayerNorm / RMSNorm forward+backward GB/s (bf16, 16K rows)", "",
            f"Device-to-device copy measured here: {copy_gbs:.0f} GB/s (bytes read + written). Bytes counted: "
            "x, y, dy, dx (10 per element); ratios are ours / theirs and ours / copy.", "", markdown(*norms),
            "", f"## Norm per-call cost: microseconds per forward+backward at {NORM_CALL_ROWS} rows, hidden "
            f"{call_hidden} (launch and host work; the bytes take well under a microsecond)", "", markdown(*calls)]
        targets.append(issue15_norm_target(measured, copy_gbs))
    text = "\n".join(sections + ["", "## Targets (issues 5 and 15)", ""] + targets + [""])
    print("\n".join(targets))
    suffix = f"-{args.only}" if args.only else ""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{slug}{suffix}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Progress reporting: model FLOPs and MFU, the console line, JSON lines and TensorBoard.

MFU follows the standard model-FLOPs count (PaLM, Megatron): 6N + 12 L h s FLOPs per token for forward and
backward, N the weights used in matrix multiplies; recomputation is not counted. The peak comes from
`--peak-tflops` or the table of known GPUs; with neither (a CPU), MFU is reported as null, never guessed.
"""
from __future__ import annotations

import json
import os
import resource
import time

import torch

# Dense bf16 peaks from the vendors' datasheets (TFLOP/s per device); see shared/REFERENCE.md.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0}


def flops_per_token(config, matmul_params: int) -> float:
    return 6.0 * matmul_params + 12.0 * config.num_layers * config.hidden_size * config.seq_length


def device_peak_tflops(override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ProgressLogger:
    """Formats one line per log interval on rank 0 and appends the same numbers as JSON."""

    def __init__(self, *, total_iters: int, tokens_per_iter: int, flops_per_iter: float, world_size: int,
                 peak_tflops: float | None, metrics_file: str | None, tensorboard_dir: str | None, is_writer: bool):
        self.total_iters, self.tokens_per_iter = total_iters, tokens_per_iter
        self.flops_per_iter, self.world_size, self.peak = flops_per_iter, world_size, peak_tflops
        self.is_writer = is_writer
        self.metrics_file = metrics_file if is_writer else None
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)
        self.tb = None
        if tensorboard_dir and is_writer:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                print("[megaengine] --tensorboard-dir given but tensorboard is not installed; skipping it", flush=True)
        self.start = time.monotonic()

    def log(self, iteration: int, *, loss: float, lr: float, grad_norm: float | None, iter_seconds: float,
            skipped: int = 0, extra: dict | None = None) -> dict:
        tokens_per_s = self.tokens_per_iter / iter_seconds
        tflops = self.flops_per_iter / iter_seconds / self.world_size / 1e12
        mfu = tflops / self.peak if self.peak else None
        elapsed = time.monotonic() - self.start
        record = {"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu,
                  "iter_ms": 1000 * iter_seconds, "memory_gib": memory_gib(), "skipped": skipped,
                  "eta_s": iter_seconds * (self.total_iters - iteration), "elapsed_s": elapsed, **(extra or {})}
        if self.is_writer:
            gn = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
            mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
            print(f"iter {iteration:>6}/{self.total_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {gn} | "
                  f"{tokens_per_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/dev | MFU {mfu_s} | "
                  f"mem {record['memory_gib']:.2f} GiB | {1000 * iter_seconds:.0f} ms/it | "
                  f"ETA {_hms(record['eta_s'])}" + (f" | skipped {skipped}" if skipped else "")
                  + "".join(f" | {k.replace('_', ' ')} {v:.4g}" for k, v in (extra or {}).items()), flush=True)
            self._write(record, "train")
        return record

    def log_eval(self, iteration: int, loss: float) -> None:
        if not self.is_writer:
            return
        ppl = _perplexity(loss)
        print(f"validation at iter {iteration} | loss {loss:.4f} | perplexity {ppl:.2f}", flush=True)
        self._write({"iteration": iteration, "valid_loss": loss, "valid_ppl": ppl}, "valid")

    def _write(self, record: dict, prefix: str) -> None:
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["iteration"])

    def close(self):
        if self.tb:
            self.tb.close()


def _perplexity(loss: float) -> float:
    import math
    return math.exp(min(loss, 50.0))


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"

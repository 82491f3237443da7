"""What the kernel files share: backend selection, the optional triton import, the interpreter check that
decides whether Triton may run on CPU tensors, launch-size helpers and the per-architecture autotuning prune."""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from megaengine.errors import ConfigError

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # triton ships for Linux only; the torch references still work elsewhere
    HAS_TRITON = False

    class _Absent:
        """Stands in for triton / triton.language so the kernel files import; nothing here can launch."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda f: f

        @staticmethod
        def Config(*_, **__):
            return None

    triton = tl = _Absent()


@triton.jit
def upcast_dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. The interpreter multiplies bfloat16 as raw uint16 bits; upcasting the already-rounded
    operands (UPCAST, set on CPU) gives the same products a tensor core would."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def interpreted(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    if type(kernel).__name__ == "Autotuner":
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(kernel, x: torch.Tensor) -> None:
    """Raise a ConfigError saying why `kernel` cannot run on `x`'s device, if it cannot."""
    if not HAS_TRITON:
        raise ConfigError("kernel backend 'triton' needs the triton package (Linux only); use backend='torch'")
    # The interpreter must have been on when triton itself was imported (its tl.sum, tl.max are jitted
    # then), not only when this kernel was defined.
    if x.device.type == "cuda" or (interpreted(kernel) and interpreted(tl.sum)):
        return
    raise ConfigError(
        f"kernel backend 'triton' got {x.device.type} tensors: Triton runs on CUDA tensors, or on CPU tensors "
        "under the Triton interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is first "
        "imported (megaengine.kernels, torch._dynamo and torch.compile import it); otherwise use "
        "backend='torch' on CPU")


def on_device(x: torch.Tensor):
    """Launch context: Triton launches on the current CUDA device, which must be the tensors' one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def prune_by_arch(pick):
    """An early_config_prune for triton.autotune: keep `pick(major, args)`, the configs for this GPU
    generation (Hopper is major 9, Ampere 8) and these arguments, out of the full list."""
    def prune(configs, nargs, **kwargs):
        major = _capability(torch.cuda.current_device())[0]
        wanted = pick(major, {**nargs, **kwargs})
        kept = [c for c in configs if any(c is w for w in wanted)]
        return kept or configs
    return prune


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def resolve_backend(backend, x: torch.Tensor, allowed: tuple) -> str:
    """None picks Triton for CUDA tensors and torch elsewhere; anything outside `allowed` is a ConfigError."""
    if backend is None:
        return "triton" if x.is_cuda and HAS_TRITON else "torch"
    if backend not in allowed:
        raise ConfigError(f"kernel backend {backend!r} is not one of {', '.join(map(repr, allowed))} here; pass one "
                          "of those, or None for the best available")
    return backend


# ----------------------------------------------------------------------------------------------------------
# Row-wise norms (layernorm.py, rmsnorm.py)
# ----------------------------------------------------------------------------------------------------------

ONE_PASS_MAX = 16384  # forward rows up to this many elements stay in registers
ONE_PASS_MAX_BWD = 8192  # the backward also holds weight and two partial-sum rows
CHUNK = 4096
INTERPRET_PROGRAMS = 4  # backward programs under the interpreter: several rows each, the last one short


def row_block(n: int, one_pass_max: int, block_n: Optional[int] = None) -> tuple[int, bool]:
    """(BLOCK_N, ONE_PASS): the whole row in one block when it fits, else CHUNK-wide pieces."""
    if block_n is None:
        block_n = next_power_of_2(n) if n <= one_pass_max else CHUNK
    return block_n, block_n >= n


def backward_programs(kernel, x: torch.Tensor, rows: int) -> tuple[int, int]:
    """(programs, rows per program) for the backward: a few per SM, each owning one partial-sum row."""
    target = INTERPRET_PROGRAMS if interpreted(kernel) or not x.is_cuda else 2 * sm_count(x.device.index or 0)
    per_program = cdiv(rows, max(1, min(rows, target)))
    return cdiv(rows, per_program), per_program


def check_norm_args(x, weight, bias, name):
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} must be ({n},), the last dim of x")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} kernels support fp16, bf16 and fp32 inputs, got {x.dtype}; use backend='torch'")


def _warps(num_warps, **kwargs):
    return [triton.Config(dict(kwargs), num_warps=w, num_stages=1) for w in num_warps]


# num_warps by GPU generation. num_stages stays 1: the row loops hold no loads Triton pipelines (the sm_90 PTX
# of the backward is byte-identical for 1, 2 and 3 stages), so other values would only be timed for nothing.
# The backward also tries PREFETCH (norms.py: the next row's loads before this row's reductions).
_NORM_CONFIGS = {
    "fwd": {"hopper": _warps((4, 8, 16)), "ampere": _warps((4, 8, 16))},
    "bwd": {gen: _warps((4, 8, 16), PREFETCH=False) + _warps((4, 8, 16), PREFETCH=True)
            for gen in ("hopper", "ampere")},
}


# Most row elements one thread may hold (BLOCK_N / (32 * num_warps)) before registers spill: found by
# tests/kernels/test_triton_compile.py, which compiles every kept config for sm_80 and sm_90. A prefetching
# backward holds the next row too.
_MAX_PER_THREAD = {"fwd": 64, "bwd": 32, "bwd-prefetch": 8}


def norm_pick(kind: str):
    """pick(major, args) for triton.autotune: this GPU generation's configs with enough threads for BLOCK_N
    (prefetching ones for one-pass rows only)."""
    table = _NORM_CONFIGS[kind]

    def pick(major, args):
        configs = table["hopper" if major >= 9 else "ampere"]
        kept = []
        for c in configs:
            prefetch = c.kwargs.get("PREFETCH", False)
            if prefetch and not args.get("ONE_PASS", True):
                continue
            limit = _MAX_PER_THREAD[f"{kind}-prefetch" if prefetch else kind]
            if args["BLOCK_N"] <= limit * 32 * c.num_warps:
                kept.append(c)
        return kept
    return pick


def norm_configs(kind: str) -> dict:
    """triton.autotune keyword arguments for a norm kernel ("fwd" or "bwd")."""
    table = _NORM_CONFIGS[kind]
    return dict(configs=table["hopper"] + table["ampere"], key=["N", "BLOCK_N"],
                prune_configs_by={"early_config_prune": prune_by_arch(norm_pick(kind))})


# (autotuner, launch key) -> the config it chose. After the first launch per key the kernel is launched with
# that config directly: the autotuner's per-call bookkeeping (a dict of every argument, its key built from
# each tensor's dtype) is host time on every call, and these kernels' calls are short.
_CHOSEN: dict = {}


def launch(kernel, tuned, grid, args, meta, key, config=None):
    """Run the plain kernel (one config) under the interpreter; on CUDA the autotuned wrapper on the first
    launch per `key`, then the kernel with the config it chose. `key` must fix everything the autotuner's own
    key reads (its key arguments and every tensor argument's dtype) and the device. A given `config` (tests)
    is launched as it is, on CUDA and under the interpreter."""
    with on_device(args[0]):
        if config is not None or interpreted(kernel):
            kernel[grid](*args, **meta, **(config.all_kwargs() if config is not None else {}))
            return
        config = _CHOSEN.get((tuned, key))
        if config is None:
            tuned[grid](*args, **meta)
            _CHOSEN[(tuned, key)] = tuned.best_config
        else:
            kernel[grid](*args, **meta, **config.all_kwargs())

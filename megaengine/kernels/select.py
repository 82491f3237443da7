"""Backend "auto": the fastest correct implementation of attention or a norm, per shape class, dtype and GPU.

On CUDA a Selector times every candidate once per key (op, shape class, dtype, device name, torch and triton
versions), excluding those that raise or whose result is off the float64 reference, keeps the fastest in
process and in a JSON file (default ~/.cache/megaengine/backends.json) and prints the choice once. On CPU the
torch path is taken without timing, as "auto" always did there. The timer is injected, so the selection logic
is tested on CPU with made-up times.

Attention candidates: ours (Triton; its backward with a dq kernel, or with dq accumulated atomically in the
dk/dv kernel), torch SDPA with the cuDNN, flash, memory-efficient and math backends.
Norm candidates: ours (Triton), ours (CUDA, csrc/), torch (F.layer_norm / F.rms_norm).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Largest relative error (max |ours - reference| / max |reference|) a candidate may show; bf16 keeps 8 bits.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CHECK_SEQ = 512  # attention is checked on the first query/key block of this many positions, one batch element
CHECK_ROWS = 64  # norms are checked on this many rows


@dataclass
class Candidate:
    """One implementation: `run()` does one timed call (forward, plus backward when training); `error()`
    returns its relative error against the reference, or raises when it cannot run this shape."""
    name: str
    run: Callable[[], object]
    error: Callable[[], float]


def cuda_timer(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of `fn` over `reps` calls timed with CUDA events, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def default_cache_file() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "megaengine", "backends.json")


def _rank0_print(line: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)


class Selector:
    """Times candidates once per key and remembers the winner (in process and in `cache_file`)."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_timer,
                 cache_file: Optional[str] = None, printer: Callable[[str], None] = _rank0_print):
        self.timer, self.printer = timer, printer
        self.cache_file = default_cache_file() if cache_file is None else cache_file
        self.choices: dict[str, str] = {}
        self.environments: dict = {}

    def environment(self, device: torch.device) -> str:
        """GPU name and torch / triton versions, part of every key; looked up once per device, so that later
        calls (and torch.compile's traces of them) only read a dict."""
        if device.index not in self.environments:
            self.environments[device.index] = _environment(device)
        return self.environments[device.index]

    def choose(self, key: str, candidates: Callable[[], list[Candidate]], tolerance: float, fallback: str,
               names: tuple) -> str:
        """The name of the fastest of `candidates()` within `tolerance`, timed on the first call for `key`
        (later calls, and later processes through the cache file, reuse it); `fallback` when none qualifies.
        `names` are the names a cached choice may take."""
        if key in self.choices:
            return self.choices[key]
        cached = self._disk().get(key)
        if cached in names:
            self.choices[key] = cached
            self.printer(f"megaengine auto backend: {key} -> {cached} (cached in {self.cache_file})")
            return cached
        timed, excluded = {}, {}
        for c in candidates():
            try:
                err = c.error()
                if not err <= tolerance:  # NaN fails too
                    excluded[c.name] = f"error {err:.1e} > {tolerance:.0e}"
                    continue
                timed[c.name] = self.timer(c.run)
            except Exception as error:  # a backend refusing the shape is a finding, not a failure
                excluded[c.name] = (str(error).strip() or type(error).__name__).splitlines()[0][:80]
        best = min(timed, key=timed.get) if timed else fallback
        self.choices[key] = best
        self._store(key, best)
        shown = ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in sorted(timed.items(), key=lambda kv: kv[1]))
        skipped = "; ".join(f"{n} ({why})" for n, why in excluded.items())
        self.printer(f"megaengine auto backend: {key} -> {best} [timed: {shown or 'none'}"
                     + (f"; excluded: {skipped}" if skipped else "") + "]")
        return best

    def _disk(self) -> dict:
        try:
            with open(self.cache_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _store(self, key: str, name: str) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_file)), exist_ok=True)
            table = {**self._disk(), key: name}
            tmp = f"{self.cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(tmp, self.cache_file)  # atomic: ranks sharing the file never read half of it
        except OSError:
            pass  # an unwritable cache only costs a re-timing in the next process


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _environment(device: torch.device) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|triton {triton_version}"


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _leaves(tensors, training: bool):
    return [t.detach().clone().requires_grad_(training) for t in tensors]


def _timed_call(fn, inputs, training: bool):
    """A call of fn on fresh leaves like `inputs`: forward, and backward with a random gradient when training."""
    leaves = _leaves(inputs, training)

    def run():
        out = fn(*leaves)
        if training:
            out.backward(torch.randn_like(out))
        return out
    return run


def _error_call(fn, reference, inputs, training: bool):
    """max relative error of fn's output (and gradients when training) against the float64 reference."""
    def error():
        ours, ref = _leaves(inputs, training), _leaves([t.double() for t in inputs], training)
        got, want = fn(*ours), reference(*ref)
        errors = [_rel_error(got, want)]
        if training:
            dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            grads = torch.autograd.grad(got, ours, dy.to(got.device, got.dtype))
            errors += [_rel_error(g, w) for g, w in zip(grads, torch.autograd.grad(want, ref, dy.to(want.device)))]
        return max(errors)
    return error


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------

def _sdpa(backend, dropout_p: float):
    def run(q, k, v):
        if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves heads/groups query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return run


def attention_runners(dropout_p: float = 0.0) -> dict:
    """name -> fn(q, k, v), causal attention; ours only without dropout (it has none)."""
    from torch.nn.attention import SDPBackend

    from megaengine.kernels.attention import flash_attention
    runners = {} if dropout_p > 0 else {
        "triton": lambda q, k, v: flash_attention(q, k, v, True, backend="triton"),
        "triton-atomic-dq": lambda q, k, v: flash_attention(q, k, v, True, backend="triton", atomic_dq=True)}
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
        runners[name] = _sdpa(backend, dropout_p)
    return runners


def attention_key(q, k, dropout_p: float, training: bool, environment: str) -> str:
    """Shape class: dtype, head dim, GQA ratio, sequence and batch x heads rounded up to powers of two."""
    batch, heads, seq, head_dim = q.shape
    return (f"attention|{str(q.dtype).replace('torch.', '')}|head_dim {head_dim}|gqa {heads // k.shape[1]}|causal"
            f"|seq<={_bucket(seq)}|batch*heads<={_bucket(batch * heads)}|"
            + ("fwd+bwd" if training else "fwd") + ("|dropout" if dropout_p > 0 else "") + f"|{environment}")


def attention_candidates(q, k, v, dropout_p: float, training: bool) -> list[Candidate]:
    """Every runner at this shape; the correctness check (at dropout 0) uses one batch element and the first
    CHECK_SEQ positions, so that the reference's seq x seq scores stay small."""
    from megaengine.kernels.attention import attention_reference
    seq = min(q.shape[2], CHECK_SEQ)
    small = [t[:1, :, :seq] for t in (q, k, v)]
    checked = attention_runners(0.0)
    return [Candidate(name, _timed_call(fn, (q, k, v), training),
                      _error_call(checked[name], lambda q, k, v: attention_reference(q, k, v, True), small, training))
            for name, fn in attention_runners(dropout_p).items()]


def attention(q, k, v, dropout_p: float = 0.0, selector: Optional["Selector"] = None):
    """Causal attention by the fastest correct backend for this shape class (q, k, v as in flash_attention;
    GQA allowed). CPU tensors take torch's SDPA without timing."""
    if not q.is_cuda:
        return _sdpa(None, dropout_p)(q, k, v)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    selector = selector or DEFAULT
    key = attention_key(q, k, dropout_p, training, selector.environment(q.device))
    if key not in selector.choices and torch.compiler.is_compiling():
        return _sdpa(None, dropout_p)(q, k, v)  # no timing inside a trace; eager calls choose
    runners = attention_runners(dropout_p)
    name = selector.choose(key, lambda: attention_candidates(q, k, v, dropout_p, training),
                           TOLERANCE.get(q.dtype, 1e-3), fallback="sdpa-math", names=tuple(runners))
    return runners[name](q, k, v)


# ----------------------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ----------------------------------------------------------------------------------------------------------

def norm_runners(kind: str, eps: float) -> dict:
    """name -> fn(x, weight, bias); kind "LayerNorm" or "RMSNorm" (bias ignored)."""
    from megaengine.kernels import layer_norm, rms_norm
    if kind == "RMSNorm":
        return {"triton": lambda x, w, b: rms_norm(x, w, eps, backend="triton"),
                "cuda": lambda x, w, b: rms_norm(x, w, eps, backend="cuda"),
                "torch": lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, eps)}
    return {"triton": lambda x, w, b: layer_norm(x, w, b, eps, backend="triton"),
            "cuda": lambda x, w, b: layer_norm(x, w, b, eps, backend="cuda"),
            "torch": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps)}


def norm_key(kind: str, x, weight, bias, environment: str) -> str:
    rows = x.numel() // x.shape[-1]
    return (f"{kind}|{str(x.dtype).replace('torch.', '')}|weight {str(weight.dtype).replace('torch.', '')}"
            f"|hidden {x.shape[-1]}|bias {bias is not None}|rows<={_bucket(rows)}|{environment}")


def norm_candidates(kind: str, x, weight, bias, eps: float, training: bool) -> list[Candidate]:
    """Every runner at this shape; correctness is checked on the first CHECK_ROWS rows."""
    from megaengine.kernels import layer_norm_reference, rms_norm_reference

    def reference(x, w, b):
        return rms_norm_reference(x, w, eps) if kind == "RMSNorm" else layer_norm_reference(x, w, b, eps)
    x2 = x.reshape(-1, x.shape[-1])
    inputs = (x2, weight) if bias is None else (x2, weight, bias)
    small = (x2[:CHECK_ROWS],) + inputs[1:]
    candidates = []
    for name, fn in norm_runners(kind, eps).items():
        def call(*t, fn=fn):
            return fn(t[0], t[1], t[2] if len(t) > 2 else None)
        candidates.append(Candidate(name, _timed_call(call, inputs, training),
                                    _error_call(call, lambda *t: reference(t[0], t[1], t[2] if len(t) > 2 else None),
                                                small, training)))
    return candidates


def norm(kind: str, x, weight, bias, eps: float, selector: Optional["Selector"] = None):
    """LayerNorm or RMSNorm of x over its last dim by the fastest correct backend for this shape class. CPU
    tensors take the torch path without timing."""
    runners = norm_runners(kind, eps)
    if not x.is_cuda:
        return runners["torch"](x, weight, bias)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    selector = selector or DEFAULT
    key = norm_key(kind, x, weight, bias, selector.environment(x.device))
    if key not in selector.choices and torch.compiler.is_compiling():
        return runners["torch"](x, weight, bias)
    name = selector.choose(key, lambda: norm_candidates(kind, x, weight, bias, eps, training),
                           max(TOLERANCE.get(x.dtype, 1e-3), TOLERANCE.get(weight.dtype, 1e-3)), fallback="torch",
                           names=tuple(runners))
    return runners[name](x, weight, bias)


# The process's selector, used by the model's "auto" backends.
DEFAULT = Selector()

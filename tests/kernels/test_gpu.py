"""Checks that need a CUDA GPU, skipped elsewhere: the csrc extension (backend "cuda") against the float64
reference, and the compiled, autotuned Triton kernels at training sizes in bf16 and fp16. (With
TRITON_INTERPRET=0 on a GPU machine, the other files of this folder also run the compiled Triton kernels, on
CUDA tensors.)

At real sizes a fixed tolerance says little, so the size tests hold ours to torch's own kernels in the same
dtype, as FlashAttention's tests do: ours may be at most twice as far from the float64 reference as torch's
SDPA (attention) or eager norm is, plus a small floor.
"""
import os

import pytest
import torch

from megaengine.kernels import (attention_reference, flash_attention, layer_norm, layer_norm_reference, rms_norm,
                                rms_norm_reference)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
compiled_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""),
                                     reason="TRITON_INTERPRET is on: the Triton kernels are not compiled")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(ours, ref):
    return ((ours.cpu().double() - ref.cpu()).abs().max() / ref.abs().max()).item()


def grads_match(fn, ref_fn, leaves, dy, tol):
    ours = fn(*leaves)
    got = torch.autograd.grad(ours, leaves, dy)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = ref_fn(*leaves64)
    want = torch.autograd.grad(ref, leaves64, dy.cpu().double())
    for name, a, b in zip(["out", "dx", "dweight", "dbias"], [ours, *got], [ref.detach(), *want]):
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.2e} > {tol:.0e}"


@needs_cuda
@pytest.mark.parametrize("dtype,weight_dtype,hidden", [
    (torch.float32, torch.float32, 100), (torch.float16, torch.float16, 1000), (torch.bfloat16, torch.bfloat16, 4096),
    (torch.bfloat16, torch.float32, 4099), (torch.bfloat16, torch.bfloat16, 65536), (torch.float32, torch.float32, 3),
    (torch.bfloat16, torch.bfloat16, 100)])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_cuda_extension_norms(kind, dtype, weight_dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, 3, hidden, generator=g) * 2 + 3).to("cuda", dtype).requires_grad_()
    w = torch.randn(hidden, generator=g).to("cuda", weight_dtype).requires_grad_()
    b = torch.randn(hidden, generator=g).to("cuda", weight_dtype).requires_grad_()
    dy = torch.randn(37, 3, hidden, generator=g).to("cuda", dtype)
    tol = max(TOLERANCE[dtype], TOLERANCE[weight_dtype])
    if kind == "layer_norm":
        grads_match(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="cuda"),
                    lambda x, w, b: layer_norm_reference(x, w, b, 1e-5), [x, w, b], dy, tol)
    else:
        grads_match(lambda x, w: rms_norm(x, w, 1e-6, backend="cuda"),
                    lambda x, w: rms_norm_reference(x, w, 1e-6), [x, w], dy, tol)


@needs_cuda
def test_cuda_extension_misaligned_weight():
    """A weight 4 bytes off 16-byte alignment takes the one-element-per-access path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    w = torch.randn(257, generator=g).to("cuda", torch.bfloat16)[1:].requires_grad_()
    dy = torch.randn(8, 256, generator=g).to("cuda", torch.bfloat16)
    grads_match(lambda x, w: rms_norm(x, w, 1e-6, backend="cuda"), lambda x, w: rms_norm_reference(x, w, 1e-6),
                [x, w], dy, TOLERANCE[torch.bfloat16])


@needs_cuda
@compiled_triton
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_attention_autotuned_long(head_dim, causal):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 8, 1000, head_dim, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2, 1000, head_dim, generator=g).to("cuda", torch.bfloat16).requires_grad_()
            for _ in range(2))
    do = torch.randn(2, 8, 1000, head_dim, generator=g).to("cuda", torch.bfloat16)
    out = flash_attention(q, k, v, causal=causal, backend="triton")
    got = [out, *torch.autograd.grad(out, [q, k, v], do)]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=causal)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, do.double())]
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(a, b) <= TOLERANCE[torch.bfloat16], f"{name}: {rel_err(a, b):.2e}"


def max_err(a, b):
    return (a.double() - b).abs().max().item()


def against_torch(name, ours, theirs, ref, floor=1e-5):
    """ours within 2x torch's error (both in the low-precision dtype) of the float64 reference."""
    assert torch.isfinite(ours).all(), f"{name} has non-finite entries"
    mine, torchs = max_err(ours, ref), max_err(theirs, ref)
    assert mine <= 2 * torchs + floor, f"{name}: error {mine:.3e} > 2 x torch's {torchs:.3e} + {floor:.0e}"


@needs_cuda
@compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim,seq", [(64, 4096), (128, 2048), (128, 4099), (256, 1024)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_attention_training_sizes(dtype, head_dim, seq, causal):
    """GQA (16 query heads, 4 kv heads), a ragged length among them, forward and every gradient."""
    g = torch.Generator(device="cuda").manual_seed(seq + head_dim)
    q = torch.randn(2, 16, seq, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 4, seq, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
            for _ in range(2))
    do = torch.randn(2, 16, seq, head_dim, device="cuda", generator=g).to(dtype)
    out = flash_attention(q, k, v, causal=causal, backend="triton")
    ours = [out, *torch.autograd.grad(out, [q, k, v], do)]

    def sdpa(q, k, v):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out_torch = sdpa(q, k, v)
    theirs = [out_torch, *torch.autograd.grad(out_torch, [q, k, v], do)]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, causal=causal)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, do.double())]
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], ours, theirs, want):
        against_torch(name, a, b, c)


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden", [1024, 4096, 5120, 8192, 12288, 65536])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms_training_sizes(kind, hidden, dtype, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("TRITON_INTERPRET is on: the Triton kernels are not compiled")
    rows = max(64, (1 << 24) // hidden)
    g = torch.Generator(device="cuda").manual_seed(hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=g) * 2 + 3).to(dtype).requires_grad_()
    w = torch.randn(hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    b = torch.randn(hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    leaves = [x, w, b] if kind == "layer_norm" else [x, w]
    if kind == "layer_norm":
        ours_fn = lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
        torch_fn = lambda x, w, b: torch.nn.functional.layer_norm(x, (hidden,), w, b, 1e-5)  # noqa: E731
        ref_fn = lambda x, w, b: layer_norm_reference(x, w, b, 1e-5)  # noqa: E731
    else:
        ours_fn = lambda x, w: rms_norm(x, w, 1e-6, backend=backend)  # noqa: E731
        torch_fn = lambda x, w: torch.nn.functional.rms_norm(x, (hidden,), w, 1e-6)  # noqa: E731
        ref_fn = lambda x, w: rms_norm_reference(x, w, 1e-6)  # noqa: E731
    outs = []
    for fn, inputs in ((ours_fn, leaves), (torch_fn, leaves), (ref_fn, [t.detach().double().requires_grad_()
                                                                       for t in leaves])):
        y = fn(*inputs)
        outs.append([y.detach(), *torch.autograd.grad(y, inputs, dy.to(y.dtype))])
    for name, a, b, c in zip(["y", "dx", "dweight", "dbias"], *outs):
        against_torch(name, a, b, c)

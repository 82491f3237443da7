"""Triton flash attention (under the interpreter) against a float64 reference: output, log-sum-exp and every
gradient, on awkward sequence lengths, GQA / MQA, causal and not, fp32 / fp16 / bf16, with NaN-poisoned
outputs so that a kernel skipping a write fails."""
import math

import pytest
import torch

from megaengine.kernels import attention_reference, flash_attention
from megaengine.kernels.attention import attention_backward, attention_forward

# max |ours - reference| / max |reference|; fp32 meets the project's 1e-5, 16-bit types their rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(ours, ref):
    return ((ours.cpu().double() - ref).abs().max() / ref.abs().max()).item()


def inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq_q), (batch, kv_heads, seq_k), (batch, kv_heads, seq_k), (batch, heads, seq_q)]
    return [torch.randn(*s, head_dim, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def nan_like(t):
    return torch.full_like(t, float("nan"))


def reference(q, k, v, do, causal):
    q64, k64, v64 = (t.cpu().double().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q64, k64, v64, causal, return_lse=True)
    out.backward(do.cpu().double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def check(q, k, v, do, causal, blocks=None, atomic_dq=False):
    """Forward and backward through the launchers with every output buffer NaN-poisoned."""
    batch, heads, seq_q, _ = q.shape
    lse = torch.full((batch, heads, seq_q), float("nan"), device=q.device)
    out, lse = attention_forward(q, k, v, causal, out=nan_like(q), lse=lse, blocks=blocks)
    dq, dk, dv = attention_backward(do, q, k, v, out, lse, causal, dq=nan_like(q), dk=nan_like(k), dv=nan_like(v),
                                    delta=nan_like(lse), blocks=blocks, atomic_dq=atomic_dq)
    want = reference(q, k, v, do, causal)
    tol = TOLERANCE[q.dtype]
    for name, ours, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
        assert torch.isfinite(ours).all(), f"{name} has unwritten (NaN) entries"
        assert rel_err(ours, ref) <= tol, f"{name}: relative error {rel_err(ours, ref):.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,seq,head_dim,causal", [
    (torch.float32, 1, 2, 2, 67, 32, True),
    (torch.float32, 1, 2, 2, 67, 32, False),
    (torch.float32, 1, 4, 2, 130, 32, True),  # GQA
    (torch.float32, 2, 2, 1, 130, 16, False),  # MQA, two batches
    (torch.float16, 1, 2, 1, 67, 64, True),
    (torch.float16, 1, 2, 2, 67, 64, False),
    (torch.bfloat16, 1, 2, 2, 67, 64, True),
    (torch.bfloat16, 1, 4, 2, 130, 32, False),
    (torch.float32, 1, 1, 1, 67, 128, True),
    (torch.bfloat16, 1, 2, 1, 35, 128, False),
    (torch.float32, 1, 1, 1, 33, 256, True),
])
def test_matches_float64_reference(dtype, batch, heads, kv_heads, seq, head_dim, causal, device):
    q, k, v, do = inputs(batch, heads, kv_heads, seq, seq, head_dim, dtype, seed=seq + head_dim + heads,
                         device=device)
    check(q, k, v, do, causal)


@pytest.mark.parametrize("blocks", [
    {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)},  # the reverse of the interpreter's default shapes
    {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)},  # one ragged block beyond the first
])
@pytest.mark.parametrize("causal", [True, False])
def test_block_shapes(blocks, causal, device):
    q, k, v, do = inputs(1, 2, 1, 130, 130, 32, torch.float32, seed=7, device=device)
    check(q, k, v, do, causal, blocks)


@pytest.mark.parametrize("seq_q,seq_k", [(50, 67), (67, 50)])
@pytest.mark.parametrize("causal", [True, False])
def test_unequal_lengths(seq_q, seq_k, causal, device):
    """Queries and keys of different lengths; causal is top-left aligned, as torch's is_causal."""
    q, k, v, do = inputs(1, 2, 2, seq_q, seq_k, 32, torch.float32, seed=seq_q, device=device)
    check(q, k, v, do, causal)


def test_public_api_autograd_noncontiguous(device):
    """flash_attention through autograd on (batch, seq, heads, dim) views, as a model produces them."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 67, h, 32, generator=g).to(device).transpose(1, 2).requires_grad_()
               for h in (4, 2, 2))
    do = torch.randn(1, 4, 67, 32, generator=g).to(device)
    out = flash_attention(q, k, v, causal=True, softmax_scale=0.3, backend="triton")
    out.backward(do)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, softmax_scale=0.3)
    ref.backward(do.cpu().double())
    for ours, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(ours, want.detach()) <= 1e-5


def test_reference_matches_sdpa():
    """The reference itself against torch's SDPA math, so the float64 yardstick is right."""
    q, k, v, _ = inputs(1, 4, 2, 19, 19, 16, torch.float64, seed=11)
    for causal in (True, False):
        ours = attention_reference(q, k, v, causal)
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal,
                                                                scale=1 / math.sqrt(16))
        torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("dtype,heads,kv_heads,seq_q,seq_k,head_dim,causal,blocks", [
    (torch.float32, 4, 2, 130, 130, 32, True, None),  # GQA: dq of every query head of a kv group
    (torch.float32, 2, 1, 67, 50, 32, False, None),  # MQA, ragged, seq_q != seq_k
    (torch.bfloat16, 2, 2, 67, 67, 64, True, {"fwd": (16, 32), "dkdv": (32, 16), "dq": (16, 32)}),
    (torch.float32, 1, 1, 130, 130, 16, False, {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)}),
])
def test_atomic_dq_matches_float64_reference(dtype, heads, kv_heads, seq_q, seq_k, head_dim, causal, blocks,
                                             device):
    """The backward that accumulates dq with atomics in the dk/dv kernel (no dq kernel) gives the reference's
    dq, dk and dv; the dq buffer is NaN-poisoned, so a row it never reaches fails."""
    q, k, v, do = inputs(1, heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=seq_q + seq_k, device=device)
    check(q, k, v, do, causal, blocks, atomic_dq=True)


def test_atomic_dq_through_autograd(device):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 40, 16, generator=g).to(device).requires_grad_() for h in (4, 2, 2))
    do = torch.randn(1, 4, 40, 16, generator=g).to(device)
    grads = {}
    for atomic in (False, True):
        flash_attention(q, k, v, causal=True, backend="triton", atomic_dq=atomic).backward(do)
        grads[atomic] = [t.grad.clone() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
    for separate, atomic in zip(grads[False], grads[True]):
        assert rel_err(atomic, separate.double()) <= 1e-5

"""Triton LayerNorm and RMSNorm (under the interpreter) against a float64 reference: output, saved statistics
and every gradient, on awkward hidden sizes, through both the one-block and the chunked row paths, with
NaN-poisoned outputs and partial-sum buffers."""
import pytest
import torch

from megaengine.kernels import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from megaengine.kernels._shared import backward_programs
from megaengine.kernels.layernorm import _layer_norm_bwd, layer_norm_backward, layer_norm_forward
from megaengine.kernels.rmsnorm import _rms_norm_bwd, rms_norm_backward, rms_norm_forward

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(ours, ref):
    return ((ours.cpu().double() - ref).abs().max() / ref.abs().max()).item()


def inputs(rows, hidden, dtype, weight_dtype, seed, device="cpu", offset=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g, dtype=torch.float64) * 2 + offset).to(device, dtype)
    w = torch.randn(hidden, generator=g, dtype=torch.float64).to(device, weight_dtype)
    b = torch.randn(hidden, generator=g, dtype=torch.float64).to(device, weight_dtype)
    dy = torch.randn(rows, hidden, generator=g, dtype=torch.float64).to(device, dtype)
    return x, w, b, dy


def nan(*shape, like):
    return torch.full(shape, float("nan"), device=like.device)


def assert_close(name, ours, ref, tol):
    assert torch.isfinite(ours).all(), f"{name} has unwritten (NaN) entries"
    assert rel_err(ours, ref) <= tol, f"{name}: relative error {rel_err(ours, ref):.2e} > {tol:.0e}"


def check_layer_norm(x, w, b, dy, block_n=None, eps=1e-5):
    rows, hidden = x.shape
    programs = backward_programs(_layer_norm_bwd, x, rows)[0]
    y, mean, rstd = layer_norm_forward(x, w, b, eps, y=torch.full_like(x, float("nan")), mean=nan(rows, like=x),
                                       rstd=nan(rows, like=x), block_n=block_n)
    dx, dw, db = layer_norm_backward(dy, x, w, mean, rstd, dx=torch.full_like(x, float("nan")),
                                     partials=nan(2, programs, hidden, like=x), block_n=block_n)
    x64, w64, b64 = (t.cpu().double().requires_grad_() for t in (x, w, b))
    ref = layer_norm_reference(x64, w64, b64, eps)
    ref.backward(dy.cpu().double())
    x_ = x.cpu().double()
    tol = max(TOLERANCE[x.dtype], TOLERANCE[w.dtype])
    assert_close("mean", mean, x_.mean(-1), 1e-6)
    assert_close("rstd", rstd, torch.rsqrt(x_.var(-1, unbiased=False) + eps), 1e-5)
    for name, ours, want in (("y", y, ref.detach()), ("dx", dx, x64.grad), ("dweight", dw, w64.grad),
                             ("dbias", db, b64.grad)):
        assert_close(name, ours, want, tol)


def check_rms_norm(x, w, dy, block_n=None, eps=1e-6):
    rows, hidden = x.shape
    programs = backward_programs(_rms_norm_bwd, x, rows)[0]
    y, rstd = rms_norm_forward(x, w, eps, y=torch.full_like(x, float("nan")), rstd=nan(rows, like=x),
                               block_n=block_n)
    dx, dw = rms_norm_backward(dy, x, w, rstd, dx=torch.full_like(x, float("nan")),
                               partials=nan(programs, hidden, like=x), block_n=block_n)
    x64, w64 = (t.cpu().double().requires_grad_() for t in (x, w))
    ref = rms_norm_reference(x64, w64, eps)
    ref.backward(dy.cpu().double())
    tol = max(TOLERANCE[x.dtype], TOLERANCE[w.dtype])
    assert_close("rstd", rstd, torch.rsqrt(x64.detach().pow(2).mean(-1) + eps), 1e-5)
    for name, ours, want in (("y", y, ref.detach()), ("dx", dx, x64.grad), ("dweight", dw, w64.grad)):
        assert_close(name, ours, want, tol)


CASES = [(torch.float32, 13, 100), (torch.float16, 13, 100), (torch.bfloat16, 13, 100),
         (torch.float32, 7, 4099), (torch.bfloat16, 7, 4099)]


@pytest.mark.parametrize("dtype,rows,hidden", CASES)
def test_layer_norm_matches_float64_reference(dtype, rows, hidden, device):
    check_layer_norm(*inputs(rows, hidden, dtype, dtype, seed=hidden, device=device))


@pytest.mark.parametrize("dtype,rows,hidden", CASES)
def test_rms_norm_matches_float64_reference(dtype, rows, hidden, device):
    x, w, _, dy = inputs(rows, hidden, dtype, dtype, seed=hidden + 1, device=device)
    check_rms_norm(x, w, dy)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_chunked_rows(dtype, weight_dtype, device):
    """Rows walked in 1024-wide chunks (the path for hidden > 8K/16K), last chunk ragged; a large mean checks
    that the chunked variance does not cancel."""
    x, w, b, dy = inputs(7, 4099, dtype, weight_dtype, seed=5, device=device, offset=300.0)
    check_layer_norm(x, w, b, dy, block_n=1024)
    check_rms_norm(x, w, dy, block_n=1024)


def test_hidden_64k(device):
    x, w, b, dy = inputs(5, 65536, torch.bfloat16, torch.bfloat16, seed=9, device=device)
    check_layer_norm(x, w, b, dy)
    check_rms_norm(x, w, dy)


def autograd_matches(fn, ref_fn, leaves, dy):
    """fn(*leaves) through autograd against ref_fn on float64 copies: output and every leaf's gradient."""
    ours = fn(*leaves)
    grads = torch.autograd.grad(ours, leaves, dy)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref = ref_fn(*leaves64)
    want = torch.autograd.grad(ref, leaves64, dy.cpu().double())
    assert ours.shape == ref.shape
    assert rel_err(ours, ref.detach()) <= 1e-5
    for got, exp in zip(grads, want):
        assert rel_err(got, exp) <= 1e-5


def test_public_api_autograd(device):
    """layer_norm (with and without bias) and rms_norm on (batch, seq, hidden) through autograd."""
    g = torch.Generator().manual_seed(4)
    x, w, b, dy = (torch.randn(*s, generator=g).to(device) for s in ((3, 5, 100), (100,), (100,), (3, 5, 100)))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    autograd_matches(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="triton"),
                     lambda x, w, b: layer_norm_reference(x, w, b, 1e-5), [x, w, b], dy)
    autograd_matches(lambda x, w: layer_norm(x, w, None, 1e-5, backend="triton"),
                     lambda x, w: layer_norm_reference(x, w, None, 1e-5), [x, w], dy)
    autograd_matches(lambda x, w: rms_norm(x, w, 1e-6, backend="triton"),
                     lambda x, w: rms_norm_reference(x, w, 1e-6), [x, w], dy)


@pytest.mark.parametrize("rms", [False, True])
def test_every_backward_config_gives_the_same_gradients(rms, device):
    """Every backward config the autotuner may pick (with and without PREFETCH; num_warps too on a GPU) gives
    the float64 reference's gradients, so its choice is one of speed only. Several rows per program, the last
    program short: the prefetch of a row past a program's end must read nothing."""
    from megaengine.kernels._shared import norm_pick
    from megaengine.kernels.norms import norm_backward, norm_forward
    rows = 13 if device.type == "cpu" else 1000
    x, w, b, dy = inputs(rows, 100, torch.float32, torch.float32, seed=11, device=device)
    bias = None if rms else b
    configs = norm_pick("bwd")(9, {"BLOCK_N": 128, "ONE_PASS": True})
    assert {c.kwargs["PREFETCH"] for c in configs} == {False, True}
    _, mean, rstd = norm_forward(x, w, bias, 1e-5, rms)
    x64, w64, b64 = (t.cpu().double().requires_grad_() for t in (x, w, b))
    ref = rms_norm_reference(x64, w64, 1e-5) if rms else layer_norm_reference(x64, w64, b64, 1e-5)
    ref.backward(dy.cpu().double())
    for c in configs:
        dx, dw, db = norm_backward(dy, x, w, mean, rstd, rms, config=c)
        assert_close(f"dx {c}", dx, x64.grad, 1e-5)
        assert_close(f"dweight {c}", dw, w64.grad, 1e-5)
        assert (db is None) if rms else rel_err(db, b64.grad) <= 1e-5

"""Grouped GEMM (MoE experts): the Triton kernels (interpreted on CPU) and the torch padded-bmm path against the
per-group F.linear loop, output, input gradient and weight gradient, with empty groups, groups that are not
a multiple of the tile, several K and N tiles, and zero rows."""
import pytest
import torch

from megaengine.errors import ConfigError
from megaengine.kernels.grouped_gemm import (grouped_linear, grouped_linear_reference, grouped_mm_forward,
                                             grouped_mm_wgrad, offsets_of)
from megaengine.testing import rel_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CASES = [  # counts per group, in, out
    ([10, 0, 18, 9], 40, 24),
    ([1], 16, 16),
    ([0, 0, 33, 0, 5, 16, 0, 2], 24, 40),
    ([17, 17, 17], 8, 48),
]


def _data(counts, fin, fout, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, fin, generator=g).to(device, dtype)
    w = (torch.randn(len(counts), fout, fin, generator=g) / fin ** 0.5).to(device, dtype)
    dy = torch.randn(rows, fout, generator=g).to(device, dtype)
    return x, w, torch.tensor(counts, device=device), dy


def _check(backend, counts, fin, fout, dtype, device="cpu", seed=0):
    x, w, c, dy = _data(counts, fin, fout, dtype, seed, device)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear(xs, ws, c, backend=backend)
    y.backward(dy)
    x64, w64 = x.cpu().double().requires_grad_(), w.cpu().double().requires_grad_()
    ref = grouped_linear_reference(x64, w64, c.cpu())
    ref.backward(dy.cpu().double())
    tol = TOLERANCE[dtype]
    for name, ours, want in (("y", y, ref), ("dx", xs.grad, x64.grad), ("dw", ws.grad, w64.grad)):
        assert ours.dtype == dtype and torch.isfinite(ours).all(), name
        assert rel_error(ours.cpu(), want) <= tol, f"{backend} {name}: {rel_error(ours.cpu(), want):.2e}"
    empty = [g for g, n in enumerate(counts) if n == 0]
    assert not ws.grad[empty].any(), "an empty group's weight gradient must be exactly zero"


@pytest.mark.parametrize("counts,fin,fout", CASES)
def test_torch_path_matches_the_loop(counts, fin, fout):
    _check("torch", counts, fin, fout, torch.float32)


@pytest.mark.parametrize("counts,fin,fout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_the_loop(counts, fin, fout, dtype, device):
    _check("triton", counts, fin, fout, dtype, device)


@pytest.mark.parametrize("blocks", [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)])
def test_triton_tiles(blocks, device):
    """Other tile sizes: the in-kernel tile-to-group search depends on BLOCK_M."""
    x, w, c, dy = _data([5, 40, 0, 21], 48, 40, torch.float32, 3, device)
    offsets = offsets_of(c)
    y = grouped_mm_forward(x, w, offsets, transpose=True, blocks=blocks)
    dx = grouped_mm_forward(dy, w, offsets, transpose=False, blocks=blocks)
    dw = grouped_mm_wgrad(dy, x, offsets, 4, blocks={"BLOCK_P": blocks["BLOCK_N"], "BLOCK_Q": blocks["BLOCK_K"],
                                                     "BLOCK_M": blocks["BLOCK_M"]})
    xr, wr = x.cpu().double().requires_grad_(), w.cpu().double().requires_grad_()
    grouped_linear_reference(xr, wr, c.cpu()).backward(dy.cpu().double())
    assert rel_error(y.cpu(), grouped_linear_reference(x.cpu().double(), w.cpu().double(), c.cpu())) <= 1e-5
    assert rel_error(dx.cpu(), xr.grad) <= 1e-5 and rel_error(dw.cpu(), wr.grad) <= 1e-5


def test_zero_rows():
    w = torch.randn(3, 8, 16, requires_grad=True)
    y = grouped_linear(torch.zeros(0, 16, requires_grad=True), w, torch.zeros(3, dtype=torch.long), backend="torch")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert not w.grad.any()


def test_bad_shapes_and_backend():
    with pytest.raises(ValueError, match="do not fit"):
        grouped_linear(torch.zeros(4, 8), torch.zeros(2, 8, 6), torch.tensor([2, 2]))
    with pytest.raises(ConfigError, match="kernel backend 'cuda'"):
        grouped_linear(torch.zeros(4, 8), torch.zeros(2, 6, 8), torch.tensor([2, 2]), backend="cuda")


def _layer_with_backends(rank, world):
    import torch.distributed as dist

    from megaengine.models.gpt import GPTConfig
    from megaengine.moe import MoEConfig, MoEMLP
    config = GPTConfig(hidden_size=16, ffn_hidden_size=16, num_layers=2, swiglu=True)
    moe = MoEConfig(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01)
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(0))
    found = {}
    for backend in ("torch", "triton"):
        layer = MoEMLP(config, moe, "layers.0.mlp", dist.group.WORLD, dist.group.WORLD, backend=backend)
        xs = x.clone().requires_grad_()
        y = layer(xs)
        y.square().sum().backward()
        found[backend] = [y, xs.grad, layer.router.weight.grad, layer.experts.fc1.grad, layer.experts.fc2.grad]
    return [rel_error(a, b) for a, b in zip(found["triton"], found["torch"])]


def test_moe_layer_with_triton_experts(device):
    """The MoE layer gives the same output and gradients with the Triton experts (interpreted) as with torch."""
    from megaengine.testing import run_distributed
    if device.type != "cpu":
        pytest.skip("checked on CPU under the interpreter (the gloo harness runs CPU tensors)")
    errors = run_distributed(_layer_with_backends, 1)[0]
    assert max(errors) <= 1e-5, errors

"""LayerNorm over the last dimension: its custom ops (Triton or the CUDA extension of megaengine.kernels.cuda),
the plain torch reference and the entry point. The kernels, launchers and autograd.Function are shared with
RMSNorm in norms.py."""
from typing import Optional

import torch

from megaengine.kernels import norms
from megaengine.kernels._shared import resolve_backend

# The kernels by the names the compile check and tests use.
_layer_norm_fwd, _layer_norm_bwd = norms._norm_fwd, norms._norm_bwd


def layer_norm_forward(x, weight, bias, eps, y=None, mean=None, rstd=None, block_n=None):
    """Triton forward on 2-d x (rows, hidden): returns (y, mean, rstd). Outputs may be given (tests pass
    NaN-filled ones); `block_n` forces the block width (tests use it to reach the chunked path)."""
    return norms.norm_forward(x, weight, bias, eps, False, y=y, mean=mean, rstd=rstd, block_n=block_n)


def layer_norm_backward(dy, x, weight, mean, rstd, dx=None, partials=None, block_n=None):
    """Triton backward: returns (dx, dweight, dbias), dweight and dbias in weight's dtype. `partials` may be a
    given (2, programs, hidden) fp32 buffer, as the outputs may in layer_norm_forward."""
    return norms.norm_backward(dy, x, weight, mean, rstd, False, dx=dx, partials=partials, block_n=block_n)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile); norms.RowNorm is the autograd.Function around them
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norms.forward(backend, x, weight, bias, eps, rms=False)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, backend):
    rows = x.shape[0]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("megaengine::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norms.backward(backend, dy, x, weight, mean, rstd, rms=False)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def layer_norm_reference(x, weight, bias=None, eps=1e-5):
    """Plain torch LayerNorm, computed in fp32 (fp64 stays fp64) and returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def layer_norm(x, weight, bias=None, eps=1e-5, backend=None):
    """LayerNorm of x (..., hidden) over hidden. backend: "triton", "cuda" (the csrc extension), "torch" (the
    reference) or None (Triton on CUDA tensors, torch on CPU)."""
    backend = resolve_backend(backend, x, ("triton", "cuda", "torch"))
    if backend == "torch":
        return layer_norm_reference(x, weight, bias, eps)
    return norms.apply(x, weight, bias, eps, backend, False, "layer_norm")

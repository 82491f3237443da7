"""RMSNorm over the last dimension, y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps): its custom ops
(Triton or the CUDA extension of megaengine.kernels.cuda), the plain torch reference and the entry point. The
kernels, launchers and autograd.Function are shared with LayerNorm in norms.py."""
import torch

from megaengine.kernels import norms
from megaengine.kernels._shared import resolve_backend

# The kernels by the names the compile check and tests use.
_rms_norm_fwd, _rms_norm_bwd = norms._norm_fwd, norms._norm_bwd


def rms_norm_forward(x, weight, eps, y=None, rstd=None, block_n=None):
    """Triton forward on 2-d x (rows, hidden): returns (y, rstd). Outputs may be given (tests pass NaN-filled
    ones); `block_n` forces the block width (tests use it to reach the chunked path)."""
    y, _, rstd = norms.norm_forward(x, weight, None, eps, True, y=y, rstd=rstd, block_n=block_n)
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, dx=None, partials=None, block_n=None):
    """Triton backward: returns (dx, dweight), dweight in weight's dtype. `partials` may be a given
    (programs, hidden) fp32 buffer."""
    dx, dw, _ = norms.norm_backward(dy, x, weight, None, rstd, True, dx=dx,
                                    partials=None if partials is None else partials[None], block_n=block_n)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile); norms.RowNorm is the autograd.Function around them
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("megaengine::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = norms.forward(backend, x, weight, None, eps, rms=True)
    return y, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("megaengine::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = norms.backward(backend, dy, x, weight, None, rstd, rms=True)
    return dx, dw


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def rms_norm_reference(x, weight, eps=1e-6):
    """Plain torch RMSNorm, computed in fp32 (fp64 stays fp64) and returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)).to(x.dtype)


def rms_norm(x, weight, eps=1e-6, backend=None):
    """RMSNorm of x (..., hidden) over hidden. backend: "triton", "cuda" (the csrc extension), "torch" (the
    reference) or None (Triton on CUDA tensors, torch on CPU)."""
    backend = resolve_backend(backend, x, ("triton", "cuda", "torch"))
    if backend == "torch":
        return rms_norm_reference(x, weight, eps)
    return norms.apply(x, weight, None, eps, backend, True, "rms_norm")

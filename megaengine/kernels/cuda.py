"""The CUDA C++ norms of csrc/ (norms.cu + the norms.cpp binding): built just in time on first use with
torch.utils.cpp_extension.load, cached in this process and on disk by torch, and selected as backend "cuda"
by layer_norm and rms_norm."""
import functools
import os
import shutil
from typing import Optional

import torch

from megaengine.errors import ConfigError

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCES = ("norms.cpp", "norms.cu")


def unavailable_reason(x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the "cuda" backend cannot run (on `x`), or None when it can be built and run."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device (or a CPU-only torch build)"
    if x is not None and not x.is_cuda:
        return f"the tensors are on {x.device.type}, not CUDA"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if shutil.which("ninja") is None:
        return "ninja not found (pip install ninja), which torch.utils.cpp_extension.load needs"
    missing = [s for s in SOURCES if not os.path.exists(os.path.join(CSRC, s))]
    if missing:
        return f"sources {missing} not found under {CSRC}"
    return None


@functools.cache
def extension():
    """Build (once per process; torch reuses an up-to-date build from its extension cache) and load."""
    from torch.utils.cpp_extension import load
    return load(name="megaengine_norms", sources=[os.path.join(CSRC, s) for s in SOURCES],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                verbose=os.environ.get("MEGAENGINE_VERBOSE_BUILD") == "1")


@functools.cache
def _process_reason() -> Optional[str]:
    """unavailable_reason() and the build, decided once per process: the checks search PATH and stat files,
    which would be host time on every norm call."""
    reason = unavailable_reason()
    if reason is None:
        try:
            extension()
        except Exception as error:  # a failed build must name itself, not surface as an obscure ImportError
            reason = f"building csrc/ failed: {error}"
    return reason


def check_available(x: torch.Tensor) -> None:
    """Raise a ConfigError naming the reason when backend "cuda" cannot run on `x`; builds on first use."""
    reason = _process_reason() if x.is_cuda else unavailable_reason(x)
    if reason is not None:
        raise ConfigError(f"kernel backend 'cuda' is unavailable: {reason}; use backend='triton' or 'torch'")


def norm_forward(x, weight, bias, eps, rms):
    """(y, mean, rstd) for 2-d contiguous CUDA x; mean is empty for RMSNorm."""
    return tuple(extension().norm_forward(x, weight, bias, eps, rms))


def norm_backward(dy, x, weight, mean, rstd, rms):
    """(dx, dweight, dbias); dbias is empty for RMSNorm. `mean` may be None for RMSNorm."""
    if mean is None:
        mean = rstd.new_empty(0)
    return tuple(extension().norm_backward(dy, x, weight, mean, rstd, rms))

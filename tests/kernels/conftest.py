"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter, or, with
TRITON_INTERPRET=0 on a CUDA machine, compiled on the GPU (the `device` fixture picks).

TRITON_INTERPRET must be set before triton is first imported: this file does it for `pytest tests/kernels`;
in a whole-suite run tests/conftest.py must do it too, since earlier test modules may import triton
(megaengine.kernels, torch._dynamo and torch.compile all do). A late setting makes the kernels raise a
ConfigError that says so, rather than fail obscurely.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "yes", "on")


@pytest.fixture
def device():
    """Where the Triton kernels under test run: CPU under the interpreter, else CUDA."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nowhere to run the Triton kernels")
    return torch.device("cuda")

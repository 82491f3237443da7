"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported: this file does it for `pytest tests/kernels`;
in a whole-suite run, tests/conftest.py must do it too, since earlier test modules may import triton
(megaengine.kernels, torch._dynamo and torch.compile all do). A late setting makes the kernels raise a
ConfigError that says so, rather than fail obscurely.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

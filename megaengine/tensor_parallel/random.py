"""Dropout randomness for tensor parallelism.

Outside the tensor-parallel region (replicated activations) every tp rank must drop the same elements, so it
uses the default generator, seeded equally on all tp ranks. Inside the region (sharded activations: attention
probabilities of this rank's heads, sequence shards) each tp rank needs its own stream, which `tp_rng()`
forks from a generator seeded per tp rank, as Megatron's CudaRNGStatesTracker does.
"""
from __future__ import annotations

import contextlib

import torch

_TP_OFFSET = 2718
_CP_OFFSET = 1_000_003
_tp_state: dict[str, torch.Tensor] = {}


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0, cp_rank: int = 0) -> None:
    """Seed the default stream (same on all tp ranks) and the tp-region stream (different per tp rank). Context-
    parallel ranks hold other tokens of the sequence, so their default streams differ too."""
    default = seed + 100 * pp_rank + _CP_OFFSET * cp_rank
    torch.manual_seed(default)
    with torch.random.fork_rng(devices=_devices()):
        torch.manual_seed(default + _TP_OFFSET + tp_rank)
        _tp_state.clear()
        _tp_state.update(_capture())


def _devices():
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _capture() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if _devices():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _devices():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def tp_rng():
    """Run the block on this tp rank's own random stream; the default stream is left untouched."""
    if not _tp_state:
        model_parallel_seed(torch.initial_seed(), 0)
    saved = _capture()
    _restore(_tp_state)
    try:
        yield
    finally:
        _tp_state.update(_capture())
        _restore(saved)


def get_states() -> dict:
    """Both streams, for checkpoints."""
    return {"default": _capture(), "tp": dict(_tp_state)}


def set_states(states: dict) -> None:
    _restore(states["default"])
    _tp_state.clear()
    _tp_state.update(states["tp"])

"""FP8 settings (Megatron's --fp8-* flags) and the checks that stop a run FP8 cannot serve, early and clearly."""
from __future__ import annotations

from dataclasses import dataclass

from megaengine.errors import ConfigError

RECIPES = ("tensorwise", "rowwise", "delayed")
ALGOS = ("max", "most_recent")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later


@dataclass(frozen=True)
class FP8Config:
    """--fp8-format, --fp8-recipe, --fp8-amax-history-len, --fp8-amax-compute-algo, --fp8-margin.

    Defaults follow Megatron-LM's flags: delayed scaling over a history of 1 (the most recent amax), margin 0.
    """
    format: str = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    margin: int = 0

    def __post_init__(self):
        from megaengine.fp8.formats import FORMATS
        checks = [
            (self.format in FORMATS, "--fp8-format", self.format, "choose e4m3 or hybrid"),
            (self.recipe in RECIPES, "--fp8-recipe", self.recipe, "choose tensorwise, rowwise or delayed"),
            (isinstance(self.amax_history_len, int) and self.amax_history_len >= 1, "--fp8-amax-history-len",
             self.amax_history_len, "must be an integer >= 1"),
            (self.amax_compute_algo in ALGOS, "--fp8-amax-compute-algo", self.amax_compute_algo,
             "choose max or most_recent"),
            (isinstance(self.margin, int) and self.margin >= 0, "--fp8-margin", self.margin,
             "must be an integer >= 0"),
        ]
        for ok, flag, value, fix in checks:
            if not ok:
                raise ConfigError(f"{flag}={value!r}: {fix}.")


def check_fp8_run(config: FP8Config | None, *, bf16: bool, fp16: bool, device=None) -> None:
    """Refuse FP8 without --bf16, with --fp16, or on a CUDA GPU without FP8 tensor cores (no silent fallback).
    A CPU device is accepted: torch emulates the FP8 matmuls there (for tests, not for speed)."""
    if config is None:
        return
    flag = f"--fp8-format {config.format}"
    if fp16:
        raise ConfigError(f"{flag} does not work with --fp16: FP8 training keeps bf16 weights and activations "
                          "around the FP8 matmuls. Use --bf16 instead of --fp16.")
    if not bf16:
        raise ConfigError(f"{flag} needs --bf16 (bf16 weights and activations around the FP8 matmuls, fp32 "
                          "master weights in the optimizer). Add --bf16.")
    import torch
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"{flag}: {device} is {name} (compute capability {capability[0]}.{capability[1]}), which has no FP8 "
            f"tensor cores; FP8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper "
            "or later). Drop --fp8-format to train in bf16.")

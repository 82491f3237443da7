"""Models built from the tensor-parallel layers."""
from megaengine.models.gpt import GPT, GPTConfig, count_parameters

__all__ = ["GPT", "GPTConfig", "count_parameters"]

"""Micro-batches for one data-parallel rank, with Megatron's pretraining sampler semantics.

Samples are consumed in global order: each micro-batch step takes the next micro * dp samples, and dp rank r
gets [r * micro, (r + 1) * micro) of them. An iteration of global batch G = micro * microbatches * dp
therefore covers samples [it * G, (it + 1) * G) whatever dp is, and `consumed_samples` (a global count) is
all a checkpoint needs to resume exactly, even at another dp size.
"""
from __future__ import annotations

import numpy as np
import torch

from megaengine.errors import ConfigError


def microbatch_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """The dataset indices of dp rank `dp_rank`'s next micro-batch."""
    start = consumed_samples + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


def iteration_indices(iteration: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int) -> list[range]:
    """The micro-batches (as index ranges) of dp rank `dp_rank` in iteration `iteration` (0-based)."""
    steps = global_batch_size // (micro_batch_size * dp_size)
    first = iteration * global_batch_size
    return [microbatch_indices(first + k * micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
            for k in range(steps)]


class MicroBatchLoader:
    """Yields (tokens, labels) int64 tensors of shape (micro_batch_size, seq_length) for one dp rank.

    Items of `dataset` are seq_length + 1 token ids: tokens = item[:-1], labels = item[1:]. Stops (raises
    StopIteration) when the dataset cannot fill the next step of micro * dp samples.
    """

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be a positive integer, got {micro_batch_size!r}.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._consumed = int(consumed_samples)

    @property
    def consumed_samples(self) -> int:
        """Samples taken by all dp ranks together so far."""
        return self._consumed

    def next_microbatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.micro_batch_size * self.dp_size
        if self._consumed + step > len(self.dataset):
            raise StopIteration(f"the dataset's {len(self.dataset)} samples are used up after "
                                f"{self._consumed}; ask for more samples (more iterations) when building it")
        indices = microbatch_indices(self._consumed, self.micro_batch_size, self.dp_rank, self.dp_size)
        batch = torch.from_numpy(np.stack([np.asarray(self.dataset[i], dtype=np.int64) for i in indices]))
        self._consumed += step
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_microbatch()

    def state_dict(self) -> dict:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._consumed = int(state["consumed_samples"])

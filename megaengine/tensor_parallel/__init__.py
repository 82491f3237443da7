"""Megatron-style tensor parallelism: sharded layers, vocab-parallel loss, tp-aware dropout randomness."""
from megaengine.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megaengine.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                               normal_init, pad_vocab_size, replicated_param)
from megaengine.tensor_parallel.random import tp_rng

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "normal_init",
           "pad_vocab_size", "replicated_param", "tp_rng", "vocab_parallel_cross_entropy"]

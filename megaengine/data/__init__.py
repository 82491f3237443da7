"""The data pipeline: tokenizer, Megatron .bin/.idx files, GPT samples with splits and blending, dp loader.

The preprocessing CLI is `python -m megaengine.data.preprocess` (not imported here, so `-m` runs it cleanly).
"""
from megaengine.data.corpus import ensure_default_corpus
from megaengine.data.dataset import (BlendedDataset, GPTDataset, blending_indices, build_datasets,
                                     parse_data_path, parse_split)
from megaengine.data.indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megaengine.data.loader import MicroBatchLoader, iteration_indices, microbatch_indices
from megaengine.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["BlendedDataset", "DTYPE_CODES", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder",
           "MicroBatchLoader", "Tokenizer", "blending_indices", "build_datasets", "ensure_default_corpus",
           "iteration_indices", "microbatch_indices", "optimal_dtype", "parse_data_path", "parse_split",
           "train_tokenizer"]

"""Context parallelism: the sequence split over a cp group, rank i holding chunks i and 2cp-1-i of 2cp.

layout.py defines which tokens a rank holds; attention.py the attention over the sharded sequence, by ring
(ring.py, p2p) or all-to-all (ulysses.py, a2a), with the per-block kernels in blocks.py; validate.py the
up-front flag checks; cost.py the bytes each comm type sends.
"""
from megaengine.context_parallel.attention import ContextParallel, context_parallel_attention
from megaengine.context_parallel.cost import attention_send_bytes
from megaengine.context_parallel.layout import (layout_order, merge_from_ranks, position_ids, split_for_rank,
                                                zigzag_indices)
from megaengine.context_parallel.validate import COMM_TYPES, check_context_parallel

__all__ = ["COMM_TYPES", "ContextParallel", "attention_send_bytes", "check_context_parallel",
           "context_parallel_attention", "layout_order", "merge_from_ranks", "position_ids", "split_for_rank",
           "zigzag_indices"]

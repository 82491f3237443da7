"""What context parallelism sends, per attention call and rank: the formulas the tests check the counted
bytes against and the planner can use. `heads` and `kv_heads` are those of the tensors the call gets (after
tp); `seq` is the whole sequence; `dtype_bytes` the size of q/k/v elements, `accum_bytes` of the gradients
ring attention accumulates (4: fp32)."""
from __future__ import annotations


def attention_send_bytes(comm_type: str, *, cp: int, batch: int, seq: int, heads: int, kv_heads: int,
                         head_dim: int, dtype_bytes: int, accum_bytes: int = 4) -> dict:
    """{"forward": bytes, "backward": bytes} one rank sends for one context-parallel attention call."""
    tokens = batch * (seq // cp) * head_dim  # elements per head of one rank's share
    if cp == 1:
        return {"forward": 0, "backward": 0}
    if comm_type == "p2p":
        kv = 2 * kv_heads * tokens  # K and V of one rank
        return {"forward": (cp - 1) * kv * dtype_bytes, "backward": (cp - 1) * kv * (dtype_bytes + accum_bytes)}
    if comm_type == "a2a":
        each_way = (cp - 1) * (2 * heads + 2 * kv_heads) * tokens * dtype_bytes // cp
        return {"forward": each_way, "backward": each_way}
    raise ValueError(f"unknown comm_type {comm_type!r}")

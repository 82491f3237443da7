"""Run one pipeline schedule on this rank: forward and backward of the local model chunks, p2p in between.

    losses = run_pipeline(build("1f1b", pp, m)[pp_rank], chunks, pp_group=group, forward_step=step,
                          num_microbatches=m, tensor_shape=(mbs, seq, hidden), dtype=torch.float32,
                          device=device, timeout=60.0, stats=stats)

`forward_step(chunk_index, module, input_or_None, microbatch_index) -> tensor` computes one micro-batch on
one chunk. On the first virtual stage it gets None (the caller feeds its own micro-batch); on the last it
returns that micro-batch's scalar loss, already divided by num_microbatches; elsewhere the activation to send,
of shape `tensor_shape`. Gradients accumulate in param.grad over the micro-batches; reducing them over data
parallel ranks is the caller's job, after run_pipeline returns.

Sent outputs are freed (Megatron's deallocate_output_tensor): once a SEND_F completes, the output's values
live on the next stage; this stage keeps only the tensor object, whose grad_fn roots the micro-batch's graph,
with its storage swapped for one element. The backward starts from the output's gradient edge, which needs
no values. Memory is saved only when nothing in the graph saved the output itself (true of the GPT, whose
last op is the residual add) and the output is not a view.

Communication: each run of consecutive SEND/RECV actions in the schedule is one batch_isend_irecv on
pp_group (global ranks from dist.get_global_rank), waited on as a whole. With `timeout` set, every wait has
that deadline and an expired or failed wait raises RuntimeError naming the global rank, stage, micro-batch and
action, so a missing peer ends the job instead of hanging it. On NCCL a wait with a timeout blocks the host
until the transfer is done (no CPU run-ahead); timeout=None waits on the stream and leaves hangs to the
process group's own timeout.

Split backward (zero-bubble B and W): B runs autograd for the input gradient only, keeping the graph, and
records the output gradients of the nodes where weights enter the input's path (found by walking the graph;
for a Linear, its addmm). W later re-runs just those nodes for their weight-side inputs and accumulates into
param.grad: no activation gradient is recomputed. The costs: the whole graph of a micro-batch, plus those
output gradients, stays alive from B until its W; the graph walk is Python work per micro-batch. If a
weight-side node feeds two of those nodes (one parameter tensor used twice in a chunk through the same
autograd node) the split falls back to a second full backward in W, which is correct but not cheaper.
"""
from __future__ import annotations

import datetime
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge, get_gradient_edge

from megaengine.pipeline.schedules import Action, comm_batches, is_first, is_last, peer_of


def run_pipeline(actions: list[Action], chunks: list[torch.nn.Module], *, pp_group, forward_step,
                 num_microbatches: int, tensor_shape, dtype: torch.dtype, device, timeout: float | None = None,
                 stats: dict | None = None, prefetch=None) -> list[torch.Tensor] | None:
    """Execute this rank's `actions`; return the per-micro-batch losses (detached) on the last stage, else None.

    If `stats` is a dict it receives: peak_held (most micro-batch chunks with activations held: forward
    done, B not yet), compute_s and wait_s (seconds computing and blocked in p2p), timeline, a list of
    (start, end, action) in seconds from the call, and freed_bytes (output bytes freed after their send).
    `prefetch(action)`, if given, is called with the next compute action before each p2p batch, so what that
    action needs (ZeRO-3's parameters) can be fetched while the transfer is waited on.
    """
    if max(a.chunk for a in actions) >= len(chunks) or any(a.microbatch >= num_microbatches for a in actions):
        raise ValueError(f"the actions name chunks {sorted({a.chunk for a in actions})} and micro-batches up to "
                         f"{max(a.microbatch for a in actions)}, but this rank has {len(chunks)} chunks and "
                         f"num_microbatches={num_microbatches}")
    run = _Run(chunks, pp_group, forward_step, num_microbatches, tuple(tensor_shape), dtype, device, timeout)
    steps = comm_batches(actions)
    for i, step in enumerate(steps):
        if step[0].is_comm:
            if prefetch is not None and i + 1 < len(steps) and not steps[i + 1][0].is_comm:
                prefetch(steps[i + 1][0])
            run.communicate(step)
        else:
            run.compute(step[0])
    run.check_done()
    if stats is not None:
        stats.update(peak_held=run.peak_held, compute_s=run.compute_s, wait_s=run.wait_s, timeline=run.timeline,
                     freed_bytes=run.freed_bytes)
    if not is_last(run.rank, len(chunks) - 1, run.size, len(chunks)):
        return None
    if len(run.losses) != num_microbatches:
        raise RuntimeError(f"the last stage computed losses for micro-batches {sorted(run.losses)} of "
                           f"{num_microbatches}: the action list is incomplete")
    return [run.losses[i] for i in range(num_microbatches)]


class _Run:
    """The state of one run_pipeline call: tensors in flight, keyed by (chunk, micro-batch)."""

    def __init__(self, chunks, pp_group, forward_step, num_microbatches, tensor_shape, dtype, device, timeout):
        self.chunks, self.group, self.forward_step = chunks, pp_group, forward_step
        self.m, self.shape, self.dtype, self.device, self.timeout = (num_microbatches, tensor_shape, dtype,
                                                                    device, timeout)
        self.rank, self.size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.global_rank = dist.get_rank()
        self.inputs = {}  # received activations (leaves that require grad); None on the first virtual stage
        self.outputs = {}  # forward outputs kept for the backward
        self.grads = {}  # received gradients of the outputs
        self.to_send = {}  # ("F" | "B", chunk, mb) -> tensor waiting for its SEND
        self.weight_grads = {}  # deferred W closures of a split backward
        self.losses = {}
        self.held = self.peak_held = self.freed_bytes = 0
        self.compute_s = self.wait_s = 0.0
        self.t0 = time.perf_counter()
        self.timeline = []

    def _first(self, chunk):
        return is_first(self.rank, chunk)

    def _last(self, chunk):
        return is_last(self.rank, chunk, self.size, len(self.chunks))

    # ---- compute ----

    def compute(self, a: Action) -> None:
        start = time.perf_counter()
        key = (a.chunk, a.microbatch)
        if a.kind == "F":
            self._forward(a, key)
        elif a.kind in ("B", "BW"):
            self._backward(a, key, split=a.kind == "B")
        else:
            self.weight_grads.pop(key)()
        end = time.perf_counter()
        self.compute_s += end - start
        self.timeline.append((start - self.t0, end - self.t0, a))

    def _forward(self, a: Action, key) -> None:
        x = None if self._first(a.chunk) else self.inputs[key]
        self.inputs[key] = x
        out = self.forward_step(a.chunk, self.chunks[a.chunk], x, a.microbatch)
        if self._last(a.chunk):
            if out.dim() != 0:
                raise ValueError(f"forward_step on the last stage must return the scalar loss of micro-batch "
                                 f"{a.microbatch}, got shape {tuple(out.shape)}")
            self.losses[a.microbatch] = out.detach()
        else:
            if tuple(out.shape) != self.shape or out.dtype != self.dtype:
                raise ValueError(f"forward_step of chunk {a.chunk} returned {tuple(out.shape)} {out.dtype}; the "
                                 f"pipeline sends tensor_shape={self.shape} dtype={self.dtype}")
            self.to_send[("F",) + key] = out.detach()
        self.outputs[key] = out
        self.held += 1
        self.peak_held = max(self.peak_held, self.held)

    def _backward(self, a: Action, key, split: bool) -> None:
        out, x = self.outputs.pop(key), self.inputs.pop(key)
        grad = None if self._last(a.chunk) else self.grads.pop(key)
        if split:
            dx, self.weight_grads[key] = backward_split(out, grad, x)
        else:
            torch.autograd.backward(_root(out), grad_tensors=grad)
            dx = None if x is None else x.grad
        if not self._first(a.chunk):
            self.to_send[("B",) + key] = dx if dx is not None else torch.zeros_like(x)
        self.held -= 1

    # ---- communication ----

    def communicate(self, batch: list[Action]) -> None:
        ops, received = [], []
        for a in batch:
            peer = dist.get_global_rank(self.group, peer_of(a, self.rank, self.size)[0])
            if a.kind.startswith("SEND"):
                ops.append(dist.P2POp(dist.isend, self.to_send.pop((a.kind[-1], a.chunk, a.microbatch)), peer,
                                      self.group))
            else:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
                received.append((a, buf))
        start = time.perf_counter()
        self._wait(dist.batch_isend_irecv(ops), batch, ops)
        self.wait_s += time.perf_counter() - start
        for a in batch:
            if a.kind == "SEND_F":
                self.freed_bytes += deallocate_output(self.outputs[(a.chunk, a.microbatch)])
        for a, buf in received:
            key = (a.chunk, a.microbatch)
            if a.kind == "RECV_F":
                self.inputs[key] = buf.requires_grad_()
            else:
                self.grads[key] = buf

    def _wait(self, works, batch: list[Action], ops) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for i, work in enumerate(works):
            try:
                if deadline is None:
                    work.wait()
                else:
                    work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            except Exception as e:  # noqa: BLE001 - re-raised with the pipeline context
                # gloo returns one work per op; NCCL one for the whole batch
                a = batch[i] if len(works) == len(batch) else batch[-1]
                peer = ops[i].peer if len(works) == len(batch) else "its neighbours"
                raise RuntimeError(
                    f"pipeline p2p wait failed (deadline {self.timeout}s): global rank {self.global_rank} "
                    f"(pipeline stage {self.rank} of {self.size}) stuck in {a.kind} of micro-batch {a.microbatch}, "
                    f"chunk {a.chunk}, with global rank {peer}; batch {batch}. A peer is missing, has crashed or "
                    f"runs a different schedule. Cause: {e}") from e

    def check_done(self) -> None:
        left = {name: sorted(d) for name, d in (("outputs", self.outputs), ("gradients", self.grads),
                                                 ("unsent", self.to_send), ("W", self.weight_grads)) if d}
        if left:
            raise RuntimeError(f"pipeline stage {self.rank}: the action list left work undone: {left}")


def deallocate_output(out: torch.Tensor) -> int:
    """Swap a sent output's storage for one element; return the bytes freed (0 where it cannot be)."""
    if out._base is not None or out.grad_fn is None or out.numel() <= 1:
        return 0
    freed = out.numel() * out.element_size()
    out.data = torch.empty((1,), dtype=out.dtype, device=out.device)
    return freed


def _root(output: torch.Tensor):
    """Where a backward from `output` starts: its gradient edge, which (unlike the tensor) needs no values,
    so it works on a deallocated output; the tensor itself when it has no grad_fn (a leaf)."""
    return get_gradient_edge(output) if output.grad_fn is not None else output


# ---- the split backward ----

def _leads_to(root, target) -> dict:
    """For every node reachable from root: whether target is reachable from it (iterative post-order)."""
    leads = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            leads[node] = node is target or any(leads[c] for c, _ in node.next_functions if c is not None)
            continue
        if node in leads:
            continue
        leads[node] = False  # visited; final value set when its children are done (the graph is a DAG)
        stack.append((node, True))
        stack.extend((c, False) for c, _ in node.next_functions if c is not None and c not in leads)
    return leads


def backward_split(output: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor | None):
    """B now: return (gradient of x, W) where calling W() later accumulates the weight gradients."""
    if grad is None:
        grad = torch.ones_like(output)
    root = output.grad_fn
    if x is None or root is None:
        return None, lambda: torch.autograd.backward(_root(output), grad)
    output = _root(output)
    leads = _leads_to(root, get_gradient_edge(x).node)
    if not leads[root]:
        return torch.zeros_like(x), lambda: torch.autograd.backward(output, grad)
    # nodes on the input's path with an input off it: their weight-side inputs are W's work
    boundary = {}
    for node, on_path in leads.items():
        if on_path:
            side = list(dict.fromkeys((c, i) for c, i in node.next_functions if c is not None and not leads[c]))
            if side:
                boundary[node] = side
    shared = Counter(c for side in boundary.values() for c in {c for c, _ in side})
    captured = {}
    hooks = [node.register_prehook(lambda g, node=node: captured.__setitem__(node, g)) for node in boundary]
    try:
        (dx,) = torch.autograd.grad(output, x, grad, retain_graph=True)
    finally:
        for h in hooks:
            h.remove()
    if any(n > 1 for n in shared.values()):
        return dx, lambda: torch.autograd.backward(output, grad, inputs=[p for p in _leaf_params(leads, x)])

    def weight_grads():
        edges, grads = [], []
        for node, side in boundary.items():
            outs = [(GradientEdge(node, i), g) for i, g in enumerate(captured.get(node, ())) if g is not None]
            if not outs:
                continue
            got = torch.autograd.grad([o for o, _ in outs], [GradientEdge(c, i) for c, i in side],
                                      [g for _, g in outs], retain_graph=True, allow_unused=True)
            for (c, i), g in zip(side, got):
                if g is not None:
                    edges.append(GradientEdge(c, i))
                    grads.append(g)
        if edges:
            torch.autograd.backward(edges, grads)

    return dx, weight_grads


def _leaf_params(leads: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (other than x) whose gradients the graph accumulates."""
    x_node = get_gradient_edge(x).node
    return [node.variable for node in leads if hasattr(node, "variable") and node is not x_node]


# ---- forward only (evaluation, sampling) ----

@torch.no_grad()
def forward_only(chunks: list[torch.nn.Module], *, pp_group, forward_step, tensor_shape, dtype, device):
    """One micro-batch through every virtual stage in order, no autograd: for evaluation and sampling.

    Chunk c of rank r is virtual stage c * pp + r, so activations go round the ring chunk by chunk with
    blocking send/recv. Returns forward_step's output of the last virtual stage on that rank, else None.
    """
    rank, size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    prev = dist.get_global_rank(pp_group, (rank - 1) % size)
    nxt = dist.get_global_rank(pp_group, (rank + 1) % size)
    out = None
    for c, chunk in enumerate(chunks):
        x = None
        if not is_first(rank, c):
            x = torch.empty(tensor_shape, dtype=dtype, device=device)
            dist.recv(x, prev, group=pp_group)
        out = forward_step(c, chunk, x)
        if not is_last(rank, c, size, len(chunks)):
            dist.send(out.contiguous(), nxt, group=pp_group)
            out = None
    return out

"""The pipeline executor on gloo ranks against a single-process reference, on a toy model.

Toy model: 8 x (Linear(16, 16) + tanh), float32, seeded init; the last stage's loss is the MSE to a target,
divided by the number of micro-batches. Every schedule must give the reference's losses and gradients, and
stay equal over a few SGD steps.
"""
import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from megaengine import parallel
from megaengine.pipeline import backward_split, build, layer_ranges, run_pipeline
from megaengine.testing import run_distributed

LAYERS, HIDDEN, MBS = 8, 16, 4
STEPS, LR = 3, 0.1


def make_layers():
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh()) for _ in range(LAYERS)]


def make_data(m):
    g = torch.Generator().manual_seed(1)
    return torch.randn(m, MBS, HIDDEN, generator=g), torch.randn(m, MBS, HIDDEN, generator=g)


def reference(m):
    """Losses per step and micro-batch, first-step grads and final weights of the whole model, one process."""
    model = torch.nn.Sequential(*make_layers())
    xs, ys = make_data(m)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    for _ in range(STEPS):
        opt.zero_grad()
        step = []
        for i in range(m):
            loss = F.mse_loss(model(xs[i]), ys[i]) / m
            loss.backward()
            step.append(loss.item())
        losses.append(step)
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _pipeline_rank(rank, world, name, pp, v, m):
    state = parallel.initialize(tp=1, pp=pp)
    layers = make_layers()
    ranges = layer_ranges(LAYERS, pp, v)[state.pp_rank]
    chunks = [torch.nn.Sequential(*layers[s:e]) for s, e in ranges]
    xs, ys = make_data(m)
    last = state.pp_rank == pp - 1

    def forward_step(c, module, x, mb):
        out = module(xs[mb] if x is None else x)
        return F.mse_loss(out, ys[mb]) / m if last and c == v - 1 else out

    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    actions = build(name, pp, m, v)[state.pp_rank]
    losses, grads, stats = [], None, {}
    for _ in range(STEPS):
        opt.zero_grad()
        out = run_pipeline(actions, chunks, pp_group=state.pp_group, forward_step=forward_step,
                           num_microbatches=m, tensor_shape=(MBS, HIDDEN), dtype=torch.float32,
                           device=state.device, timeout=60.0, stats=stats)
        losses.append(None if out is None else [t.item() for t in out])
        if grads is None:
            grads = {f"{s + i}.0.{n}": p.grad.clone() for (s, _), c in zip(ranges, chunks)
                     for i, layer in enumerate(c) for n, p in layer[0].named_parameters()}
        opt.step()
    weights = {f"{s + i}.0.{n}": p.detach().clone() for (s, _), c in zip(ranges, chunks)
               for i, layer in enumerate(c) for n, p in layer[0].named_parameters()}
    return losses, grads, weights, stats["peak_held"]


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,pp,v,m", [
    ("gpipe", 2, 1, 4), ("1f1b", 2, 1, 4), ("interleaved", 2, 2, 4), ("zb-h1", 2, 1, 4),
    ("interleaved", 4, 2, 8), ("zb-h1", 4, 1, 6), ("zb-h1", 1, 1, 2),
])
def test_schedule_matches_single_process(name, pp, v, m):
    ref_losses, ref_grads, ref_weights = reference(m)
    world = 4 if pp == 2 else pp  # pp=2 runs two pipelines side by side (dp=2): one pp group is global ranks 2, 3
    results = run_distributed(_pipeline_rank, world, name, pp, v, m)
    seen = set()
    for rank, (losses, grads, weights, _) in enumerate(results):
        if rank % pp == pp - 1:
            for got, want in zip(losses, ref_losses):
                assert got == pytest.approx(want, rel=1e-5), (rank, got, want)
        else:
            assert losses == [None] * STEPS
        for n, g in grads.items():
            assert _close(g, ref_grads[n]), (name, rank, n, (g - ref_grads[n]).abs().max())
            assert _close(weights[n], ref_weights[n]), (name, rank, n)
            seen.add(n)
    assert seen == set(ref_grads)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_peak_held_activations(name):
    pp, m = 4, 16
    peaks = [r[3] for r in run_distributed(_pipeline_rank, pp, name, pp, 1, m)]
    want = [m] * pp if name == "gpipe" else [min(pp - s, m) for s in range(pp)]
    assert peaks == want


def _missing_peer_rank(rank, world, timeout, leave):
    state = parallel.initialize(tp=1, pp=2)
    if state.pp_rank == 1:  # this stage never shows up for the step: it hangs elsewhere, or exits
        if not leave:
            time.sleep(timeout + 1)
        return None
    chunk = torch.nn.Linear(HIDDEN, HIDDEN)
    start = time.monotonic()
    try:
        run_pipeline(build("1f1b", 2, 2)[0], [chunk], pp_group=state.pp_group,
                     forward_step=lambda c, mod, x, mb: mod(torch.ones(MBS, HIDDEN)), num_microbatches=2,
                     tensor_shape=(MBS, HIDDEN), dtype=torch.float32, device=state.device, timeout=timeout)
    except RuntimeError as e:
        return str(e), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.parametrize("leave", [False, True])
def test_missing_peer_raises_with_context(leave):
    timeout = 2.0
    msg, elapsed = run_distributed(_missing_peer_rank, 2, timeout, leave, timeout=60)[0]
    assert "global rank 0" in msg and "pipeline stage 0" in msg, msg
    # 1F1B on stage 0 first sends micro-batch 0 forward; gloo's send waits for the receive, which never comes
    assert "SEND_F of micro-batch 0" in msg and "global rank 1" in msg, msg
    assert elapsed < timeout + 10, elapsed  # an exited peer may fail the wait before the deadline


# ---- the split backward, on one process ----

class CountingTanh(torch.autograd.Function):
    calls = Counter()

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        CountingTanh.calls["backward"] += 1
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("reuse", ["none", "distinct nodes", "shared node"])
def test_backward_split_equals_backward_and_skips_input_path(reuse):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
    norm = torch.nn.LayerNorm(HIDDEN)
    params = list(layers.parameters()) + list(norm.parameters())

    def f(x):
        for layer in layers:
            x = CountingTanh.apply(layer(x))
        w = layers[0].weight * 1.0
        if reuse == "distinct nodes":  # the weight used twice, through two different autograd nodes
            x = x @ w + x @ w.t()
        if reuse == "shared node":  # one node (w) feeds two matmuls on the input's path: W must fall back
            x = CountingTanh.apply(x @ w) @ w
        return norm(x)

    x0, g = torch.randn(MBS, HIDDEN), torch.randn(MBS, HIDDEN)
    x = x0.clone().requires_grad_()
    f(x).backward(g)
    want, want_dx = _grads(params), x.grad.clone()
    for p in params:
        p.grad = None
    x = x0.clone().requires_grad_()
    out = f(x)
    CountingTanh.calls.clear()
    dx, weight_grads = backward_split(out, g, x)
    calls = 4 if reuse == "shared node" else 3
    assert torch.allclose(dx, want_dx) and all(p.grad is None for p in params)
    assert CountingTanh.calls["backward"] == calls
    weight_grads()
    # W re-runs no activation gradient, except in the fallback, which repeats the whole backward
    assert CountingTanh.calls["backward"] == (2 * calls if reuse == "shared node" else calls)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(_grads(params), want))

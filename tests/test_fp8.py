"""FP8 linear numerics on CPU, per recipe: exact against a plain-torch emulation, and within the FP8 error bound.

Emulation: quantize each operand with the scale the recipe defines (tensorwise: 448/amax of the tensor;
rowwise: per slice along the kept dimension; delayed: the scale in the layer's history), dequantize, matmul in
fp32 with the operand layout torch's CPU _scaled_mm uses (row-major (M, K) @ row-major (K, N)). The result must
be bit-identical: oneDNN (AMX machines) is switched off so torch's emulated kernel runs.

Error bound. Rounding to nearest gives |q(v) - v| <= u |v| + d, with u = 2^-4 (e4m3, 3 mantissa bits) or 2^-3
(e5m2, 2 bits) and d half the smallest subnormal divided by the scale (values below the normal range). For a
dot product of length K, with ea <= ua |a| + da and eb <= ub |b| + db:
    |sum q(a_k) q(b_k) - sum a_k b_k| <= (ua + ub + ua ub) sum |a_k||b_k| + (1 + ua) db sum |a_k|
                                          + (1 + ub) da sum |b_k| + K da db,
plus fp32 rounding, at most (K + 4) 2^-24 sum |a_k||b_k| here, and the output rounding (2^-24 or 2^-8 of
|y| for fp32 or bf16 output). So per element, relative to sum |a||b| (not to |y|, which can cancel): 2^-3 +
2^-8 for e4m3 x e4m3, 2^-4 + 2^-3 + 2^-7 for e4m3 x e5m2 (hybrid gradients).
"""
import warnings

import pytest
import torch

from megaengine.errors import ConfigError
from megaengine.fp8 import (E4M3, E5M2, FP8Config, check_fp8_run, fp8_linear, make_scaling, set_grad_divisor,
                            update_amax_history)
from megaengine.fp8.scaling import DY, W, X, DelayedScaling

FORMAT_OF = {"e4m3": (E4M3, E4M3), "hybrid": (E4M3, E5M2)}
M, K, N = 48, 64, 32


@pytest.fixture(autouse=True)
def _emulated_kernel():
    with warnings.catch_warnings():  # the flags context also sets oneDNN's TF32 switch, and warns about it
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.linspace(0.1, 4.0, M)[:, None]  # rows of unequal size
    w = torch.randn(N, K, generator=g) * 0.02
    dy = torch.randn(M, N, generator=g) * 1e-3
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def _run(x, w, dy, scaling):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, scaling=scaling)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _scale(t, fmt, dim=None):
    a = t.abs().float().amax() if dim is None else t.abs().float().amax(dim=dim, keepdim=True)
    return fmt.max / a


def _qdq(t, scale, fmt):
    """quantize, then dequantize as the matmul does (times the inverse scale)"""
    return (t.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() * scale.reciprocal()


def _operand_scales(recipe, x, w, dy, fwd, bwd, state=None):
    """the scale of each operand of each matmul: fwd (x, w), dgrad (dy, w), wgrad (dy, x)"""
    if recipe == "tensorwise":
        sx, sw, sdy = _scale(x, fwd), _scale(w, fwd), _scale(dy, bwd)
        return {"fwd": (sx, sw), "dgrad": (sdy, sw), "wgrad": (sdy, sx)}
    if recipe == "delayed":
        sx, sw, sdy = state.scale[X], state.scale[W], state.scale[DY]
        return {"fwd": (sx, sw), "dgrad": (sdy, sw), "wgrad": (sdy, sx)}
    return {"fwd": (_scale(x, fwd, 1), _scale(w, fwd, 1)), "dgrad": (_scale(dy, bwd, 1), _scale(w, fwd, 0)),
            "wgrad": (_scale(dy, bwd, 0), _scale(x, fwd, 0))}


def _emulate(scales, x, w, dy, fwd, bwd, out_dtype):
    (a, b), (c, d), (e, f) = scales["fwd"], scales["dgrad"], scales["wgrad"]
    y = _qdq(x, a, fwd) @ _qdq(w, b, fwd).t().contiguous()
    dx = _qdq(dy, c, bwd) @ _qdq(w, d, fwd)
    dw = _qdq(dy, e, bwd).t().contiguous() @ _qdq(x, f, fwd)
    return y.to(out_dtype), dx.to(out_dtype), dw.to(out_dtype)


def _warmed_delayed(config, x, w, dy):
    """a delayed-scaling state whose history holds one step on 1.5x the data, so its scales are not those
    current scaling would pick, and no value of the data saturates"""
    state = make_scaling(config)
    _run(1.5 * x, 1.5 * w, 1.5 * dy, state)
    update_amax_history([state])
    return state


def _matmuls(scales, x, w, dy):
    """the operands, high precision, of each matmul as (A, B, A's scale, B's scale, which slot formats)"""
    (a, b), (c, d), (e, f) = scales["fwd"], scales["dgrad"], scales["wgrad"]
    return {"fwd": (x, w.t(), a, b.t(), (X, W)), "dgrad": (dy, w, c, d, (DY, W)),
            "wgrad": (dy.t(), x, e.t(), f, (DY, X))}


def error_bound(A, B, scale_a, scale_b, fa, fb, out_unit):
    """The per-element bound of the module docstring for FP8(A) @ FP8(B) against the exact A @ B."""
    A, B = A.double().abs(), B.double().abs()
    ua, ub = fa.unit_roundoff, fb.unit_roundoff
    sa = scale_a.double().reshape(-1, 1) if scale_a.dim() else scale_a.double()  # per row of A, or one
    sb = scale_b.double().reshape(1, -1) if scale_b.dim() else scale_b.double()  # per column of B, or one
    da, db = fa.min_subnormal / 2 / sa, fb.min_subnormal / 2 / sb
    k = A.shape[1]
    ab = A @ B
    return ((ua + ub + ua * ub + (k + 4) * 2.0 ** -24) * ab + (1 + ua) * db * A.sum(1, keepdim=True)
            + (1 + ub) * da * B.sum(0, keepdim=True) + k * da * db + out_unit * (ab * (1 + ua) * (1 + ub)))


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_exact_against_emulation_and_within_the_bound(recipe, fmt):
    config = FP8Config(format=fmt, recipe=recipe)
    fwd, bwd = FORMAT_OF[fmt]
    x, w, dy = _data()
    state = _warmed_delayed(config, x, w, dy) if recipe == "delayed" else make_scaling(config)
    got = _run(x, w, dy, state)
    scales = _operand_scales(recipe, x, w, dy, fwd, bwd, state)
    for name, a, b in zip(("y", "dx", "dw"), got, _emulate(scales, x, w, dy, fwd, bwd, torch.float32)):
        assert torch.equal(a, b), f"{recipe}/{fmt} {name}: max diff {(a - b).abs().max().item():.3g}"
    formats = (fwd, fwd, bwd)
    for (name, (A, B, sa, sb, (i, j))), out in zip(_matmuls(scales, x, w, dy).items(), got):
        bound = error_bound(A, B, sa, sb, formats[i], formats[j], 2.0 ** -24)
        err = (out.double() - A.double() @ B.double()).abs()
        assert (err <= bound).all(), f"{recipe}/{fmt} {name}: error/bound {(err / bound).max().item():.3f}"
        assert (err / bound).max() > 0.05  # the bound is not vacuous for these data


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "delayed"])
def test_bf16_operands_and_outputs(recipe):
    """bf16 in, bf16 out (the training setting): still exactly the emulation, rounded once at the end."""
    config = FP8Config(format="hybrid", recipe=recipe)
    x, w, dy = _data(1, torch.bfloat16)
    state = _warmed_delayed(config, x, w, dy) if recipe == "delayed" else make_scaling(config)
    got = _run(x, w, dy, state)
    assert all(t.dtype == torch.bfloat16 for t in got)
    want = _emulate(_operand_scales(recipe, x, w, dy, E4M3, E5M2, state), x, w, dy, E4M3, E5M2, torch.bfloat16)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bias_and_3d_input():
    x, w, _ = _data(2)
    bias = torch.randn(N)
    x3 = x.reshape(12, 4, K)
    scaling = make_scaling(FP8Config(recipe="tensorwise"))
    y = fp8_linear(x3, w, bias, scaling=scaling)
    assert y.shape == (12, 4, N)
    assert torch.equal(y, (fp8_linear(x, w, scaling=scaling) + bias).view(12, 4, N))


def _state_with(values_per_step, algo, length=3):
    """Drive a DelayedScaling with tensors of known amax: values_per_step[i] = (x, w, dy) amax of step i."""
    state = DelayedScaling(FP8Config(format="hybrid", recipe="delayed", amax_history_len=length,
                                     amax_compute_algo=algo))
    seen = []
    for amaxes in values_per_step:
        used = []
        for slot, a in enumerate(amaxes):
            t = torch.tensor([[a, -a / 2]])
            used.append(state.quantize(t, slot, 1, record=True).scale.item())
        seen.append((used, state.amax_history.clone(), state.scale.clone()))
        update_amax_history([state])
        seen[-1] += (state.amax_history.clone(), state.scale.clone())
    return seen


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_history_and_scales_against_a_hand_computed_sequence(algo):
    steps = [(2.0, 0.5, 4.0), (8.0, 0.25, 1.0), (1.0, 0.125, 0.0), (0.5, 0.125, 2.0)]
    seen = _state_with(steps, algo)
    fmax = torch.tensor([448.0, 448.0, 57344.0])
    history, scale = torch.zeros(3, 3), torch.ones(3)
    for i, (amaxes, (used, _, _, hist_after, scale_after)) in enumerate(zip(steps, seen)):
        if i == 0:  # no history yet: current scaling
            assert used == [448.0 / 2.0, 448.0 / 0.5, 57344.0 / 4.0]
        else:  # the scale computed at the end of the previous step, whatever this step's amax
            assert used == scale.tolist()
        history = torch.cat([torch.tensor([amaxes]), history[:-1]])
        a = history.amax(0) if algo == "max" else history[0]
        scale = torch.where(a > 0, fmax / a, scale)
        assert torch.equal(hist_after, history) and torch.equal(scale_after, scale)
    # spelled out for the gradient slot: amaxes 4, 1, 0 (unused), 2
    want = {"max": [57344 / 4, 57344 / 4, 57344 / 4, 57344 / 2],
            "most_recent": [57344 / 4, 57344 / 1, 57344 / 1, 57344 / 2]}[algo]
    assert [s[4][DY].item() for s in seen] == want


def test_recomputed_forward_counts_once_and_reuses_the_scales():
    """torch.utils.checkpoint runs the forward twice: same gradients, same history as without it."""
    from torch.utils.checkpoint import checkpoint
    x, w, dy = _data(3)
    results = []
    for recompute in (False, True):
        state = make_scaling(FP8Config(recipe="delayed", amax_history_len=4, amax_compute_algo="max"))
        for step in range(3):
            xs, ws = (x * (1 + step)).requires_grad_(), w.clone().requires_grad_()
            f = lambda a, b: torch.tanh(fp8_linear(a, b, scaling=state))  # noqa: E731
            y = checkpoint(f, xs, ws, use_reentrant=False) if recompute else f(xs, ws)
            y.backward(dy)
            update_amax_history([state])
        results.append((y.detach(), xs.grad, ws.grad, state.amax_history.clone(), state.scale.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradients_in_global_units_make_the_history_independent_of_dp():
    """A rank of n data-parallel replicas sees n times the gradients of one process (each divides its loss by its
    own share of the batch): told so by set_grad_divisor, it records the same history and casts the same FP8
    bits (exactly, n a power of two), so a checkpoint's history fits any dp size."""
    x, w, dy = _data(5)
    runs = []
    for n in (1, 4):
        module = torch.nn.Module()
        module.fp8 = make_scaling(FP8Config(recipe="delayed", amax_history_len=2, amax_compute_algo="max"))
        set_grad_divisor([module], n)
        for step in range(3):
            xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
            fp8_linear(xs, ws, scaling=module.fp8).backward(dy * n * (1 + step))
            update_amax_history([module])
        runs.append((xs.grad / n, ws.grad / n, module.fp8.amax_history.clone(), module.fp8.scale.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_evaluation_does_not_touch_the_history():
    x, w, _ = _data(4)
    state = make_scaling(FP8Config(recipe="delayed"))
    with torch.no_grad():
        fp8_linear(x, w.requires_grad_(), scaling=state)
    assert state.pending.eq(0).all()


def test_state_dict_casts_and_history_length_changes():
    state = _state_with([(2.0, 0.5, 4.0), (8.0, 0.25, 1.0)], "max", length=3)
    module = torch.nn.Module()
    module.fp8 = DelayedScaling(FP8Config(recipe="delayed", amax_history_len=3, amax_compute_algo="max"))
    for amaxes in [(2.0, 0.5, 4.0), (8.0, 0.25, 1.0)]:
        module.fp8.pending.copy_(torch.tensor(amaxes))
        update_amax_history([module])
    assert set(module.state_dict()) == {"fp8.amax_history", "fp8.scale"}
    module.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in module.buffers())
    assert torch.equal(module.fp8.amax_history, state[-1][3])
    for length in (1, 5):
        other = torch.nn.Module()
        other.fp8 = DelayedScaling(FP8Config(recipe="delayed", amax_history_len=length))
        other.load_state_dict(module.state_dict())
        newest = module.fp8.amax_history[:length]
        assert torch.equal(other.fp8.amax_history[: newest.shape[0]], newest)
        assert other.fp8.amax_history[newest.shape[0]:].eq(0).all() and other.fp8.warm == [True] * 3
        assert torch.equal(other.fp8.scale, module.fp8.scale)


@pytest.mark.parametrize("kwargs,flag", [({"format": "e5m2"}, "--fp8-format"), ({"recipe": "mxfp8"}, "--fp8-recipe"),
                                         ({"amax_history_len": 0}, "--fp8-amax-history-len"),
                                         ({"amax_compute_algo": "mean"}, "--fp8-amax-compute-algo"),
                                         ({"margin": -1}, "--fp8-margin")])
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        FP8Config(**kwargs)


def test_fp8_needs_bf16_and_a_gpu_with_fp8(monkeypatch):
    c = FP8Config()
    with pytest.raises(ConfigError, match="--fp16"):
        check_fp8_run(c, bf16=False, fp16=True)
    with pytest.raises(ConfigError, match="needs --bf16"):
        check_fp8_run(c, bf16=False, fp16=False)
    check_fp8_run(c, bf16=True, fp16=False, device="cpu")
    check_fp8_run(None, bf16=False, fp16=True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(ConfigError, match=r"cuda:0 is NVIDIA A100-SXM4-80GB \(compute capability 8.0\)"):
        check_fp8_run(c, bf16=True, fp16=False, device="cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_fp8_run(c, bf16=True, fp16=False, device="cuda:0")

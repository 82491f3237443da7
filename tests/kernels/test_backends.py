"""Backend selection and its errors, the custom ops' registrations, and the kernels under torch.compile."""
import os
import subprocess
import sys

import pytest
import torch

from megaengine.kernels import (attention_reference, flash_attention, layer_norm, layer_norm_reference, rms_norm,
                                rms_norm_reference)
from megaengine.errors import ConfigError


def small_inputs(device="cpu", seed=0):
    """q, k, v (GQA, 19 tokens), and x, weight, bias for a norm over 33 features."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 2, 19, 16), (1, 1, 19, 16), (1, 1, 19, 16), (5, 33), (33,), (33,)]
    return [torch.randn(*s, generator=g).to(device) for s in shapes]


def test_default_backend_on_cpu_is_the_torch_reference():
    q, k, v, x, w, b = small_inputs()
    assert torch.equal(flash_attention(q, k, v), attention_reference(q, k, v))
    assert torch.equal(layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_backend_errors_name_the_value_and_the_choices():
    q, k, v, x, w, b = small_inputs()
    with pytest.raises(ConfigError, match="'cutlass'.*'triton'"):
        layer_norm(x, w, b, 1e-5, backend="cutlass")
    with pytest.raises(ConfigError, match="'cuda' is not one of"):
        flash_attention(q, k, v, backend="cuda")  # no CUDA attention kernel
    with pytest.raises(ConfigError, match="'cuda' is unavailable"):
        rms_norm(x, w, 1e-6, backend="cuda")  # CPU tensors
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(torch.randn(1, 1, 8, 48), torch.randn(1, 1, 8, 48), torch.randn(1, 1, 8, 48),
                        backend="triton")
    with pytest.raises(ValueError, match="kv heads"):
        flash_attention(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """Triton imported before TRITON_INTERPRET=1: the kernels say what to do instead of failing obscurely."""
    code = ("import os, torch, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from megaengine.kernels import rms_norm\n"
            "rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, backend='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr, result.stderr[-2000:]


def test_custom_op_registrations(device):
    """Schema, fake (meta) kernels and AOT dispatch of every custom op, checked by torch itself."""
    q, k, v, x, w, b = small_inputs(device)
    out, lse = torch.ops.megaengine.flash_attn_fwd(q, k, v, True, 0.25)
    rstd = x.var(1, unbiased=False).add(1e-5).rsqrt()
    ops = torch.ops.megaengine
    for op, args in [(ops.flash_attn_fwd.default, (q, k, v, True, 0.25)),
                     (ops.flash_attn_bwd.default, (torch.randn_like(q), q, k, v, out, lse, True, 0.25)),
                     (ops.layer_norm_fwd.default, (x, w, b, 1e-5, "triton")),
                     (ops.layer_norm_fwd.default, (x, w, None, 1e-5, "triton")),
                     (ops.layer_norm_bwd.default, (torch.randn_like(x), x, w, x.mean(1), rstd, "triton")),
                     (ops.rms_norm_fwd.default, (x, w, 1e-6, "triton")),
                     (ops.rms_norm_bwd.default, (torch.randn_like(x), x, w, rstd, "triton"))]:
        torch.library.opcheck(op, args)


def transformer_block(x, w, b, w_qkv):
    h = layer_norm(x, w, b, 1e-5, backend="triton")
    batch, seq, hidden = x.shape
    qkv = (h @ w_qkv).view(batch, seq, 3, 2, hidden // 2).permute(2, 0, 3, 1, 4)
    a = flash_attention(qkv[0], qkv[1], qkv[2], causal=True, backend="triton")
    return rms_norm(a.transpose(1, 2).reshape(batch, seq, hidden) + x, w, 1e-6, backend="triton")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler, device):
    """The kernels trace without graph breaks and give eager's values and gradients."""
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(*s, generator=g).to(device).requires_grad_() for s in ((2, 33, 32), (32,), (32,))]
    leaves.append((torch.randn(32, 96, generator=g) / 6).to(device).requires_grad_())

    def run(fn):
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    torch._dynamo.reset()
    for got, want in zip(run(torch.compile(transformer_block, backend=compiler, fullgraph=True)),
                         run(transformer_block)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""The GPT with the Triton attention and norm kernels (interpreted on CPU) equals the GPT with torch's."""
import pytest
import torch

from megaengine.testing import rel_error, run_distributed

TOL = 1e-5  # fp32


def _loss_and_grads(rank, world, variant, attention, norm):
    from megaengine import parallel
    from megaengine.models import GPT, GPTConfig
    parallel.initialize()
    extra = {"llama": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                           num_query_groups=1, add_bias_linear=False)}.get(variant, {})
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=19, vocab_size=50,
                    hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8,
                    attention_backend=attention, normalization_backend=norm, **extra)
    model = GPT(cfg)
    with torch.no_grad():  # norms start at ones/zeros: randomise them so their gradients are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gpt_triton_backends_equal_torch(variant):
    (loss, grads), = run_distributed(_loss_and_grads, 1, variant, "triton", "triton")
    (ref_loss, ref_grads), = run_distributed(_loss_and_grads, 1, variant, "torch", "torch")
    assert rel_error(loss, ref_loss) <= TOL
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) <= TOL, name

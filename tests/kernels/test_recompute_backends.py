"""Activation recomputation through the Triton attention and norm kernels (custom ops inside autograd
Functions, interpreted on CPU): loss and every gradient equal those without recomputation (fp32, <= 1e-6),
with hidden dropout on (the Triton attention has no dropout of its own)."""
import torch

from megaengine.models.recompute import RecomputeConfig
from megaengine.testing import rel_error, run_distributed

TOL = 1e-6


def _loss_and_grads(rank, world, recompute):
    from megaengine import parallel
    from megaengine.models import GPT, GPTConfig
    from megaengine.parallel.mesh import seed_everything
    from megaengine.tensor_parallel.random import model_parallel_seed
    if not parallel.is_initialized():
        parallel.initialize()
    seed_everything(3)
    model_parallel_seed(3, 0)
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16, vocab_size=50,
                    make_vocab_size_divisible_by=8, hidden_dropout=0.1, attention_dropout=0.0,
                    position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=1,
                    attention_backend="triton", normalization_backend="triton", **recompute)
    model = GPT(cfg)
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


VARIANTS = [dict(recompute=RecomputeConfig("selective")), dict(recompute=RecomputeConfig("full", "uniform", 2))]


def _all(rank, world):
    return [_loss_and_grads(rank, world, kw) for kw in [{}] + VARIANTS]


def test_triton_backends_under_recompute_equal_no_recompute():
    ((ref_loss, ref_grads), *runs), = run_distributed(_all, 1)
    for kw, (loss, grads) in zip(VARIANTS, runs):
        assert rel_error(loss, ref_loss) <= TOL, kw
        for name in ref_grads:
            assert rel_error(grads[name], ref_grads[name]) <= TOL, (kw, name)

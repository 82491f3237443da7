"""Tensor-parallel layers and the GPT at tp=2 and tp=4 against dense single-process references (fp32, CPU).

Bound: relative error ||ours - reference|| / ||reference|| <= 1e-5 for outputs, input grads and weight grads.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from megaengine.testing import rel_error, run_distributed, single_rank_groups

TOL = 1e-5


def _seeded(seed):
    def init(t):
        g = torch.Generator().manual_seed(seed)
        t.copy_(torch.randn(t.shape, generator=g))
    return init


def _full(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _layers_case(rank, world, sp):
    from megaengine.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megaengine.tensor_parallel import vocab_parallel_cross_entropy
    group, errors = dist.group.WORLD, {}
    s, b, fin, fout = 8, 3, 12, 16

    def seq_shard(t):
        return t.chunk(world, 0)[rank] if sp else t

    # Column -> Row, the Megatron MLP pattern, against two dense nn.Linear.
    col = ColumnParallelLinear(fin, fout, sequence_parallel=sp, group=group, init_method=_seeded(1))
    row = RowParallelLinear(fout, fin, sequence_parallel=sp, group=group, init_method=_seeded(2))
    with torch.no_grad():
        col.bias.copy_(_full(fout, 3).chunk(world)[rank])
        row.bias.copy_(_full(fin, 4))
    dense1, dense2 = nn.Linear(fin, fout), nn.Linear(fout, fin)
    with torch.no_grad():
        dense1.weight.copy_(_full((fout, fin), 1)), dense1.bias.copy_(_full(fout, 3))
        dense2.weight.copy_(_full((fin, fout), 2)), dense2.bias.copy_(_full(fin, 4))
    x_full, dy_full = _full((s, b, fin), 5), _full((s, b, fin), 6)
    x = seq_shard(x_full).clone().requires_grad_()
    y = row(torch.tanh(col(x)))
    y.backward(seq_shard(dy_full))
    xr = x_full.clone().requires_grad_()
    yr = dense2(torch.tanh(dense1(xr)))
    yr.backward(dy_full)
    errors["mlp_out"] = rel_error(y, seq_shard(yr))
    errors["mlp_dx"] = rel_error(x.grad, seq_shard(xr.grad))
    errors["col_dw"] = rel_error(col.weight.grad, dense1.weight.grad.chunk(world, 0)[rank])
    errors["col_db"] = rel_error(col.bias.grad, dense1.bias.grad.chunk(world, 0)[rank])
    errors["row_dw"] = rel_error(row.weight.grad, dense2.weight.grad.chunk(world, 1)[rank])
    errors["row_db"] = rel_error(row.bias.grad, dense2.bias.grad)

    # Column with gather_output, and Row taking a replicated input.
    if not sp:
        colg = ColumnParallelLinear(fin, fout, gather_output=True, group=group, init_method=_seeded(1))
        rowr = RowParallelLinear(fout, fin, input_is_parallel=False, group=group, init_method=_seeded(2))
        x = x_full.clone().requires_grad_()
        y = rowr(colg(x))
        y.backward(dy_full)
        xr = x_full.clone().requires_grad_()
        yr = nn.functional.linear(dense1(xr) - dense1.bias, dense2.weight)
        yr.backward(dy_full)
        errors["gather_out"] = rel_error(y, yr)
        errors["gather_dx"] = rel_error(x.grad, xr.grad)

    # Vocab-parallel embedding and cross entropy against nn.Embedding and F.cross_entropy.
    vocab, h = 24, 8
    emb = VocabParallelEmbedding(vocab, h, group, sequence_parallel=sp, init_method=_seeded(7))
    dense_emb = nn.Embedding(vocab, h)
    with torch.no_grad():
        dense_emb.weight.copy_(_full((vocab, h), 7))
    ids = torch.randint(0, vocab, (s, b), generator=torch.Generator().manual_seed(8))
    dy = _full((s, b, h), 9)
    emb(ids).backward(seq_shard(dy))
    ref = dense_emb(ids)
    ref.backward(dy)
    errors["emb_out"] = rel_error(emb(ids), seq_shard(ref))
    errors["emb_dw"] = rel_error(emb.weight.grad, dense_emb.weight.grad.chunk(world)[rank])

    logits_full = _full((s, b, vocab), 10).requires_grad_()
    target = torch.randint(0, vocab, (s, b), generator=torch.Generator().manual_seed(11))
    shard = logits_full.detach().chunk(world, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group)
    weights = _full((s, b), 12)
    (loss * weights).sum().backward()
    ref = nn.functional.cross_entropy(logits_full.reshape(-1, vocab), target.reshape(-1), reduction="none")
    (ref.reshape(s, b) * weights).sum().backward()
    errors["ce_loss"] = rel_error(loss, ref.reshape(s, b))
    errors["ce_grad"] = rel_error(shard.grad, logits_full.grad.chunk(world, -1)[rank])
    return errors


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_layers_match_dense(tp, sp):
    for rank_errors in run_distributed(_layers_case, tp, sp):
        for name, err in rank_errors.items():
            assert err <= TOL, f"{name}: relative error {err:.2e} at tp={tp} sp={sp}"


GPT_VARIANTS = {
    "gpt2": {},
    "llama": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
                  add_bias_linear=False, untie_embeddings_and_output_weights=True),
}


def _gpt_case(rank, world, tp, variant, sp):
    from megaengine import parallel
    from megaengine.models import GPT, GPTConfig
    from megaengine.tensor_parallel.layers import take_shard
    state = parallel.initialize(tp=tp)
    ref_group = single_rank_groups()
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=200,
                    hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8,
                    sequence_parallel=sp, **GPT_VARIANTS[variant])
    ref_cfg = GPTConfig(**{**cfg.to_dict(), "sequence_parallel": False})
    model, ref = GPT(cfg, state.tp_group), GPT(ref_cfg, ref_group)
    g = torch.Generator().manual_seed(100 + state.dp_rank)  # dp ranks see different data, tp ranks the same
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=g)
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    ref_loss = ref(ids[:, :-1], ids[:, 1:]).mean()
    ref_loss.backward()
    # Vocab padding grows with tp (a multiple of 8 x tp): padded rows are zero and get zero gradient.
    ref_params = dict(ref.named_parameters())
    errors = {"loss": rel_error(loss, ref_loss)}
    for name, p in model.named_parameters():
        full_grad = ref_params[name].grad
        if name in ("word_embeddings.weight", "output_layer.weight"):
            pad = full_grad.new_zeros(model.vocab_size - ref.vocab_size, full_grad.shape[1])
            full_grad = torch.cat([full_grad, pad])
            full_weight = torch.cat([ref_params[name].detach(), pad])
            errors[name + " (value)"] = rel_error(p, take_shard(full_weight, p, state.tp_rank, tp))
        errors[name] = rel_error(p.grad, take_shard(full_grad, p, state.tp_rank, tp))
    return errors


@pytest.mark.parametrize("tp,world,variant,sp", [
    (2, 4, "gpt2", False), (4, 4, "gpt2", False), (2, 4, "llama", False), (2, 2, "gpt2", True), (2, 4, "llama", True), (4, 4, "gpt2", True),
])
def test_gpt_loss_and_grads_match_tp1(tp, world, variant, sp):
    for rank, rank_errors in enumerate(run_distributed(_gpt_case, world, tp, variant, sp)):
        for name, err in rank_errors.items():
            assert err <= TOL, f"rank {rank} {name}: relative error {err:.2e} (tp={tp} {variant} sp={sp})"


def _sequence_column_case(rank, world):
    """A sequence-parallel column layer keeps its input's shard for backward, not the gathered input; in a
    split backward, B (input gradient) reduce-scatters and gathers nothing, W (weight gradients) gathers the
    shard again and reduce-scatters nothing; the gradients equal a plain backward's."""
    from megaengine import parallel
    from megaengine.parallel import comm
    from megaengine.pipeline.executor import backward_split
    from megaengine.plan.measure import SavedBytes
    from megaengine.tensor_parallel import ColumnParallelLinear
    state = parallel.initialize(tp=world)
    col = ColumnParallelLinear(16, 32, sequence_parallel=True, group=state.tp_group, init_method=_seeded(1))
    x = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    with SavedBytes(col.parameters()) as saved:
        y = col(x * 1.0)  # x * 1.0: the stage input feeds an op first, as in the GPT
    plain = torch.autograd.grad(y, [x, col.weight, col.bias], torch.ones_like(y), retain_graph=True)
    comm.comm_stats.reset()
    dx, w = backward_split(y, torch.ones_like(y), x)
    b_volume = dict(comm.comm_stats.bytes)
    comm.comm_stats.reset()
    w()
    w_volume = dict(comm.comm_stats.bytes)
    shard = x.numel() * 4
    return (saved.total == shard, set(b_volume) == {"reduce_scatter"}, set(w_volume) == {"all_gather"},
            max(rel_error(a, b) for a, b in ((dx, plain[0]), (col.weight.grad, plain[1]), (col.bias.grad, plain[2]))))


def test_sequence_parallel_column_keeps_the_shard_and_splits_its_backward():
    for saved_shard, b_only_scatters, w_only_gathers, err in run_distributed(_sequence_column_case, 2):
        assert saved_shard and b_only_scatters and w_only_gathers
        assert err <= TOL

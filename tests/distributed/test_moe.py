"""The MoE layer at expert parallelism 1, 2 and 4 (and tp 2 x ep 2 with sequence parallelism) against a
token-by-token loop over all experts in float64 (megaengine.moe.reference), on 4 gloo ranks, fp32.

Every rank routes its own micro-batch. Checked, at relative error <= 1e-5: the output, the input gradient, the
router's gradient (its own tokens: under sequence parallelism summed over tp) and each local expert's gradient
(the sum over the expert group's micro-batches of the reference gradients), with the load-balancing and z losses
on and their gradient scaled by `aux_loss_scale`; the logged loss values against their formulas; both
dispatchers, dropless and with capacity dropping (both policies).

Communication per layer and rank, counted by comm_stats and compared exactly with the routing:
- alltoall, forward: all_to_all bytes = (A + R) h 4 (fp32), A this rank's kept assignments (k T dropless), R
  the rows it receives for its experts; what leaves the rank is (A - L) + (R - L) rows, L the assignments that
  stay (own tokens to own experts). Summed over the ep group, 2 k T ep h 4 bytes before drops. Plus an
  all_gather of the per-expert counts (ep E int64). The backward repeats both all-to-alls, splits swapped.
- allgather, forward: all_gather of ep T (h fp32 + k fp32 weights + k int64 ids), reduce_scatter of ep T h fp32;
  backward: reduce_scatter of ep T (h + k) fp32 and all_gather of ep T h fp32.
- tp 2 (sequence parallel), T being the rank's shard: an all_reduce of the E int64 counts in forward, and in
  backward of the router's and the local experts' gradients (summed over tp; fp32).
The layer also equals transformers' MixtralSparseMoeBlock on the same weights.
"""
import pytest
import torch
import torch.distributed as dist

from megaengine.testing import rel_error, run_distributed

TOL = 1e-5
SEQ, BATCH, HIDDEN, FFN, EXPERTS, TOPK = 8, 2, 32, 24, 8, 2
AUX, ZLOSS, SCALE = 0.1, 0.05, 0.5
VARIANTS = {  # name: (dispatcher, capacity factor, drop policy)
    "alltoall": ("alltoall", None, "probs"),
    "allgather": ("allgather", None, "probs"),
    "alltoall-capacity-probs": ("alltoall", 1.0, "probs"),
    "allgather-capacity-position": ("allgather", 0.75, "position"),
}


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _whole_weights(config, name):
    """Router and all E experts' weights, built whole from the same seeds as the layer (float64)."""
    import math

    from megaengine.models.gpt import seeded_init
    std, seed = config.init_method_std, config.init_seed
    router = torch.empty(EXPERTS, HIDDEN)
    seeded_init(seed, f"{name}.router", std)(router)
    fc1, fc2 = torch.empty(EXPERTS, 2 * FFN, HIDDEN), torch.empty(EXPERTS, HIDDEN, FFN)
    for e in range(EXPERTS):
        seeded_init(seed, f"{name}.experts.{e}.fc1", std)(fc1[e])
        seeded_init(seed, f"{name}.experts.{e}.fc2", std / math.sqrt(2 * config.num_layers))(fc2[e])
    return [w.double().requires_grad_() for w in (router, fc1, fc2)]


def _reference(config, name, d, capacity, policy):
    """Reference forward and backward on dp rank d's whole micro-batch: its result and gradients."""
    from megaengine.moe.reference import moe_reference
    router, fc1, fc2 = _whole_weights(config, name)
    x = _randn((SEQ, BATCH, HIDDEN), d).double().reshape(-1, HIDDEN).requires_grad_()
    dy = _randn((SEQ, BATCH, HIDDEN), 100 + d).double().reshape(-1, HIDDEN)
    ref = moe_reference(x, router, fc1, fc2, TOPK, capacity, policy)
    loss = (ref["out"] * dy).sum() + SCALE * (AUX * ref["load_balancing_loss"] + ZLOSS * ref["z_loss"])
    loss.backward()
    return {**ref, "dx": x.grad, "router": router.grad, "fc1": fc1.grad, "fc2": fc2.grad}


def ep_groups(world, tp, ep):
    """The expert-parallel groups of global ranks, as the mesh makes them with pp 1: ep consecutive dp ranks."""
    dp = world // tp
    return [[(g * ep + e) * tp + t for e in range(ep)] for g in range(dp // ep) for t in range(tp)]


def _layout(rank, world, tp, ep):
    """(the mesh's state, the dp indices of this rank's expert-parallel group)."""
    from megaengine import parallel
    state = parallel.initialize(tp=tp, ep=ep)
    members = next(g for g in ep_groups(world, tp, ep) if rank in g)
    return state, [m // tp for m in members]


def _case(rank, world, tp, ep, variants):
    from megaengine.models.gpt import GPTConfig
    from megaengine.moe import MoEConfig, MoEMLP, pop_moe_stats
    from megaengine.parallel.comm import comm_stats
    state, member_dps = _layout(rank, world, tp, ep)
    tp_group, ep_group = state.tp_group, state.ep_group
    d, t, sp = rank // tp, rank % tp, tp > 1
    config = GPTConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=2, swiglu=True, sequence_parallel=sp,
                       init_seed=11)
    errors, counted, name = {}, {}, "layers.1.mlp"
    local = EXPERTS // ep
    mine = slice((rank // tp % ep) * local, (rank // tp % ep + 1) * local)

    def shard(full):  # this tp rank's sequence shard of a (seq * batch, ...) tensor
        return full.view(SEQ, BATCH, *full.shape[1:]).chunk(tp, 0)[t].reshape(-1, *full.shape[1:])

    for label, (dispatcher, capacity, policy) in variants.items():
        moe = MoEConfig(num_experts=EXPERTS, moe_router_topk=TOPK, moe_aux_loss_coeff=AUX, moe_z_loss_coeff=ZLOSS,
                        moe_expert_capacity_factor=capacity, moe_token_drop_policy=policy,
                        moe_token_dispatcher_type=dispatcher)
        layer = MoEMLP(config, moe, name, tp_group, ep_group)
        layer.aux_loss_scale = SCALE
        x = _randn((SEQ, BATCH, HIDDEN), d).chunk(tp, 0)[t].clone().requires_grad_()
        dy = _randn((SEQ, BATCH, HIDDEN), 100 + d).chunk(tp, 0)[t]
        comm_stats.reset()
        y = layer(x)
        forward, forward_volume = dict(comm_stats.bytes), dict(comm_stats.volume)
        y.backward(dy)
        total = dict(comm_stats.bytes)

        refs = {m: _reference(config, name, m, capacity, policy) for m in member_dps}
        ref = refs[d]
        stats, _ = pop_moe_stats(layer)
        for key in stats:
            if sp:
                dist.all_reduce(stats[key], group=tp_group)
        expected = {
            "out": shard(ref["out"]), "dx": shard(ref["dx"]), "router": ref["router"],
            "fc1": sum(r["fc1"] for r in refs.values())[mine], "fc2": sum(r["fc2"] for r in refs.values())[mine]}
        ours = {"out": y.reshape(-1, HIDDEN), "dx": x.grad.reshape(-1, HIDDEN), "router": layer.router.weight.grad,
                "fc1": layer.experts.fc1.grad, "fc2": layer.experts.fc2.grad}
        for key in expected:
            errors[f"{label}:{key}"] = rel_error(ours[key], expected[key])
        for key in ("load_balancing_loss", "z_loss"):
            errors[f"{label}:{key}"] = rel_error(stats[key], ref[key])
        if capacity is not None:
            errors[f"{label}:dropped"] = abs(stats["dropped_fraction"].item() - (1 - ref["kept"].double().mean()))
            assert not ref["kept"].all(), f"{label}: nothing was dropped, the capacity case tests nothing"
        counted[label] = {"forward": forward, "forward_volume": forward_volume, "total": total,
                          "expected": _expected_bytes(dispatcher, refs, d, mine, ep, tp, shard)}
    return errors, counted


def _expected_bytes(dispatcher, refs, d, mine, ep, tp, shard):
    """Per-rank bytes from the reference routing of the expert group's micro-batches (module docstring)."""
    row, tokens, local = HIDDEN * 4, SEQ * BATCH // tp, EXPERTS // ep
    expected = {"forward": {}, "forward_volume": {}, "total": {}}
    if tp > 1:  # the router's counts summed over tp; the router's and experts' gradients summed over tp
        grads = EXPERTS * HIDDEN + local * 3 * FFN * HIDDEN
        expected["forward"]["all_reduce"] = EXPERTS * 8
        expected["total"]["all_reduce"] = EXPERTS * 8 + grads * 4
    if ep == 1:
        return expected
    if dispatcher == "allgather":
        gather, scatter = ep * tokens * (row + TOPK * 4 + TOPK * 8), ep * tokens * row
        expected["forward"].update(all_gather=gather, reduce_scatter=scatter)
        expected["total"].update(all_gather=gather + ep * tokens * row,
                                 reduce_scatter=scatter + ep * tokens * (row + TOPK * 4))
        return expected
    experts_of = {m: shard(r["experts"])[shard(r["kept"])] for m, r in refs.items()}
    ours = experts_of[d]
    sent, stays = ours.numel(), int(((ours >= mine.start) & (ours < mine.stop)).sum())
    received = sum(int(((e >= mine.start) & (e < mine.stop)).sum()) for e in experts_of.values())
    expected["forward"].update(all_to_all=(sent + received) * row, all_gather=ep * EXPERTS * 8)
    expected["forward_volume"]["all_to_all"] = (sent + received - 2 * stays) * row
    expected["total"].update(all_to_all=2 * (sent + received) * row, all_gather=ep * EXPERTS * 8)
    return expected


@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 2), (1, 4), (2, 2)])
def test_moe_layer_matches_the_token_loop(tp, ep):
    variants = VARIANTS if tp == 1 else {k: VARIANTS[k] for k in ("alltoall", "allgather")}
    results = run_distributed(_case, 4, tp, ep, variants)
    for rank, (errors, counted) in enumerate(results):
        bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank} (tp {tp}, ep {ep}): {bad}"
        for label, c in counted.items():
            for phase in ("forward", "total", "forward_volume"):
                for op, want in c["expected"][phase].items():
                    got = c[phase].get(op, 0)
                    assert got == want, f"rank {rank} {label} {phase} {op}: {got} bytes, theory {want}"
    if ep > 1:  # summed over an expert group: 2 k T h elements per rank before drops, T its tokens
        for members in ep_groups(4, tp, ep):
            sent = sum(results[r][1]["alltoall"]["forward"]["all_to_all"] for r in members)
            assert sent == 2 * TOPK * (SEQ * BATCH // tp) * HIDDEN * 4 * ep


def _hf_case(rank, world):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from megaengine.models.gpt import GPTConfig
    from megaengine.moe import MoEConfig, MoEMLP
    config = GPTConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_layers=2, swiglu=True, init_seed=5)
    moe = MoEConfig(num_experts=EXPERTS, moe_router_topk=TOPK)
    ours = MoEMLP(config, moe, "layers.0.mlp", dist.group.WORLD, dist.group.WORLD).eval()
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=EXPERTS,
                                             num_experts_per_tok=TOPK)).eval()
    with torch.no_grad():  # transformers 5 stores Mixtral's experts stacked: [gate; up] and down, as we do
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.fc1)
        hf.experts.down_proj.copy_(ours.experts.fc2)
        x = _randn((SEQ, BATCH, HIDDEN), 3)
        return rel_error(ours(x).transpose(0, 1), hf(x.transpose(0, 1).contiguous()))


def test_layer_equals_transformers_mixtral_block():
    pytest.importorskip("transformers")
    assert run_distributed(_hf_case, 1)[0] <= TOL

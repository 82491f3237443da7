"""The MoE router's pieces against their definitions (single process): top-k softmax with renormalised
weights (Mixtral's order equals Megatron's softmax over the top-k logits), capacity dropping against a
straightforward per-expert loop, the load-balancing and z losses against their formulas (and their sequence-
parallel shares adding up), the parameter counts, and the bad-input errors naming Megatron's flags."""
import math

import pytest
import torch

from megaengine.errors import ConfigError
from megaengine.moe import MoEConfig, check_moe, expert_capacity, moe_layer_pattern
from megaengine.moe.reference import kept_reference
from megaengine.moe.router import capacity_mask, load_balancing_loss, topk_softmax, z_loss
from megaengine.testing import rel_error

TOL = 1e-5


def _logits(tokens, experts, seed, scale=2.0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * scale


def test_topk_softmax_is_mixtral_and_megatron_routing():
    logits = _logits(64, 8, 0)
    probs, weights, experts = topk_softmax(logits, 2)
    # Mixtral (Hugging Face): softmax over all experts, top-k, renormalise.
    full = logits.softmax(-1)
    top, idx = full.topk(2, dim=-1)
    assert torch.equal(experts, idx) and rel_error(weights, top / top.sum(-1, keepdim=True)) <= TOL
    # Megatron (use_pre_softmax=False): top-k of the logits, softmax over those k.
    top_logits, idx2 = logits.topk(2, dim=-1)
    assert torch.equal(experts, idx2) and rel_error(weights, top_logits.softmax(-1)) <= TOL
    assert rel_error(probs, full) <= TOL and torch.allclose(weights.sum(-1), torch.ones(64))


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("tokens,experts,k,factor", [(40, 4, 2, 1.0), (33, 8, 2, 0.5), (16, 4, 1, 1.25),
                                                     (24, 6, 3, 2.0), (20, 4, 2, 0.1)])
def test_capacity_mask_matches_the_loop(policy, tokens, experts, k, factor):
    logits = _logits(tokens, experts, tokens * 7 + k)
    logits[: tokens // 2, 0] += 3.0  # crowd expert 0 so it overflows
    _, weights, ids = topk_softmax(logits, k)
    capacity = expert_capacity(tokens, experts, k, factor)
    kept = capacity_mask(ids, weights, experts, capacity, policy)
    assert torch.equal(kept, kept_reference(ids, weights, experts, capacity, policy))
    per_expert = torch.bincount(ids[kept], minlength=experts)
    assert int(per_expert.max()) <= capacity
    # Nothing is dropped from an expert under capacity.
    wanted = torch.bincount(ids.flatten(), minlength=experts)
    assert torch.equal(per_expert, wanted.clamp(max=capacity))


def test_capacity_ties_go_to_the_earlier_token():
    ids = torch.tensor([[0], [0], [0], [1]])  # k = 1: every weight is 1.0, all tied
    weights = torch.ones(4, 1)
    for policy in ("probs", "position"):
        assert capacity_mask(ids, weights, 2, 2, policy).flatten().tolist() == [True, True, False, True]


def test_capacity_formula_is_megatrons():
    assert expert_capacity(4096, 8, 2, 1.0) == 1024
    assert expert_capacity(100, 8, 2, 1.0) == 25
    assert expert_capacity(100, 8, 2, 1.1) == math.ceil(100 * 2 / 8 * 1.1) == 28
    assert expert_capacity(10, 64, 1, 1.0) == 1


def test_load_balancing_and_z_loss_formulas():
    tokens, experts, k = 50, 8, 2
    logits = _logits(tokens, experts, 3)
    probs, _, ids = topk_softmax(logits, k)
    counts = torch.bincount(ids.flatten(), minlength=experts)
    f = torch.tensor([(ids == i).sum().item() for i in range(experts)], dtype=torch.float64) / (tokens * k)
    p = probs.double().mean(0)
    expected = experts * (f * p).sum()
    assert rel_error(load_balancing_loss(probs, counts, tokens, k), expected) <= TOL
    lse = torch.log(torch.exp(logits.double()).sum(-1))
    assert rel_error(z_loss(logits, tokens), (lse ** 2).mean()) <= TOL
    # Perfect balance: uniform probabilities and counts give exactly 1.
    uniform = torch.full((tokens * experts // k, experts), 1.0 / experts)
    even = torch.full((experts,), tokens * experts // k * k // experts)
    assert abs(load_balancing_loss(uniform, even, tokens * experts // k, k).item() - 1.0) < 1e-6


def test_sequence_parallel_shares_add_up():
    tokens, experts, k = 48, 4, 2
    logits = _logits(tokens, experts, 5)
    probs, _, ids = topk_softmax(logits, k)
    counts = torch.bincount(ids.flatten(), minlength=experts)  # what the tp all-reduce of the counts gives
    full = load_balancing_loss(probs, counts, tokens, k)
    shares = sum(load_balancing_loss(p, counts, tokens, k) for p in probs.chunk(3))
    assert rel_error(shares, full) <= TOL
    assert rel_error(sum(z_loss(lg, tokens) for lg in logits.chunk(3)), z_loss(logits, tokens)) <= TOL


def test_layer_pattern():
    assert moe_layer_pattern(4, 1) == [True] * 4
    assert moe_layer_pattern(5, 2) == [True, False, True, False, True]
    assert moe_layer_pattern(3, (0, 1, 1)) == [False, True, True]


@pytest.mark.parametrize("kwargs,layout,flags", [
    (dict(num_experts=6), dict(ep=4, dp=4), ["--num-experts=6", "--expert-model-parallel-size", "1, 2, 3, 6"]),
    (dict(num_experts=8), dict(ep=4, dp=6), ["--expert-model-parallel-size (--ep)=4", "data-parallel size 6"]),
    (dict(num_experts=4, moe_router_topk=5), {}, ["--moe-router-topk=5", "--num-experts (4)"]),
    (dict(num_experts=4, moe_router_topk=0), {}, ["--moe-router-topk=0"]),
    (dict(num_experts=4), dict(tp=2), ["--sequence-parallel", "tp=2"]),
    (dict(num_experts=4), dict(add_bias_linear=True), ["--disable-bias-linear"]),
    (dict(num_experts=4, moe_expert_capacity_factor=0.0), {}, ["--moe-expert-capacity-factor=0.0"]),
    (dict(num_experts=4, moe_token_dispatcher_type="flex"), {}, ["--moe-token-dispatcher-type=flex", "alltoall"]),
    (dict(num_experts=4, moe_token_drop_policy="random"), {}, ["--moe-token-drop-policy=random"]),
    (dict(num_experts=4, moe_layer_freq=(1, 0)), {}, ["--moe-layer-freq", "--num-layers 4"]),
    (dict(num_experts=4, moe_aux_loss_coeff=-1.0), {}, ["--moe-aux-loss-coeff=-1.0"]),
])
def test_bad_input_names_the_flag(kwargs, layout, flags):
    with pytest.raises(ConfigError) as err:
        check_moe(MoEConfig(**kwargs), num_layers=4, **layout)
    for flag in flags:
        assert flag in str(err.value), str(err.value)


def test_ep_without_experts():
    check_moe(None, num_layers=4)
    with pytest.raises(ConfigError, match=r"--expert-model-parallel-size \(--ep\)=2 needs experts"):
        check_moe(None, num_layers=4, ep=2, dp=2)


def test_good_layouts_pass_and_presets_parse():
    check_moe(MoEConfig(num_experts=8, moe_router_topk=2), num_layers=4, ep=4, dp=8, tp=2, sequence_parallel=True)
    check_moe(MoEConfig(num_experts=8, moe_layer_freq=(1, 0, 1, 0)), num_layers=4, ep=8, dp=8)
    import json
    import os
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("moe-tiny.json", "mixtral-8x7b.json"):
        preset = json.load(open(os.path.join(root, name)))
        moe = MoEConfig.from_dict(preset)
        check_moe(moe, num_layers=preset["num_layers"], ep=moe.num_experts, dp=moe.num_experts, tp=2,
                  sequence_parallel=preset["sequence_parallel"], add_bias_linear=not preset["disable_bias_linear"])
    assert MoEConfig.from_dict({"num_layers": 2}) is None


def test_mixtral_parameter_counts():
    """The preset's model has Mixtral 8x7B's published 46.7B parameters, 12.9B of them active per token; model
    FLOPs count the active ones (the output layer included)."""
    import os

    from megaengine.config import resolve
    from megaengine.models.gpt import count_parameters
    preset = os.path.join(os.path.dirname(__file__), "..", "configs", "mixtral-8x7b.json")
    config = resolve(["--config", preset], 8).model
    counts = count_parameters(config)
    assert round(counts["total"] / 1e9, 1) == 46.7 and round(counts["active"] / 1e9, 1) == 12.9, counts
    norms = (2 * config.num_layers + 1) * config.hidden_size
    assert counts["matmul"] == counts["active"] - norms - config.vocab_size * config.hidden_size  # input embedding

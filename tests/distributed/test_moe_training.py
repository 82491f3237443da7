"""MoE training end to end through megaengine.training.main on gloo ranks: expert-parallel layouts equal one
process, checkpoints reshard across ep, and the flags fail early on bad input.

The model: 4 layers with the MoE pattern [1,0,1,1] (a dense layer in between), 4 SwiGLU experts, top-2, load
balancing and z losses on (their gradients shape every later step). Per iteration, the loss, the logged
load-balancing and z losses and the grad norm must agree with the single process to 1e-5 relative (fp32).
"""
import json

import pytest

from megaengine.config import resolve
from megaengine.errors import ConfigError
from megaengine.testing import run_distributed
from test_training import model_flags, train

TOL = 1e-5
MOE = {"num-layers": 4, "normalization": "RMSNorm", "position-embedding-type": "rope", "swiglu": True,
       "disable-bias-linear": True, "num-experts": 4, "moe-router-topk": 2, "moe-ffn-hidden-size": 24,
       "moe-layer-freq": "[1,0,1,1]", "moe-aux-loss-coeff": 0.1, "moe-z-loss-coeff": 0.01}
LOGGED = ("loss", "load_balancing_loss", "z_loss", "grad_norm")

LAYOUTS = {  # name: (world size, flags)
    "ep2": (2, {"ep": 2}),
    "ep4": (4, {"ep": 4}),
    "ep2-tp2-sp": (4, {"ep": 2, "tp": 2, "sequence-parallel": True}),
    "ep2-pp2": (4, {"ep": 2, "pp": 2}),
    "ep2-dp4-zero1": (4, {"ep": 2, "use-distributed-optimizer": True}),  # expert-data-parallel 2
    # Beyond the list: zero bubble's split backward, and the other dispatcher with ZeRO-2.
    "ep2-pp2-zb-h1": (4, {"ep": 2, "pp": 2, "pipeline-schedule": "zb-h1"}),
    "ep2-dp4-zero2-allgather": (4, {"ep": 2, "moe-token-dispatcher-type": "allgather",
                                    "zero-config": "configs/zero/zero2.json"}),
}


def moe_flags(prefix, tok, **over):
    return model_flags(prefix, tok, **{**MOE, **over})


def assert_same_metrics(ours, reference, label):
    assert ours.keys() == reference.keys(), (label, ours.keys(), reference.keys())
    for it in ours:
        for key in LOGGED:
            a, b = ours[it][key], reference[it][key]
            assert abs(a - b) <= TOL * abs(b), f"{label}: iteration {it} {key} {a} vs {b}"


@pytest.fixture(scope="module")
def moe_reference(tiny_corpus, tmp_path_factory):
    prefix, tok = tiny_corpus
    return train(1, moe_flags(prefix, tok), tmp_path_factory.mktemp("moe-ref") / "m.jsonl")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_five_moe_steps_match_single_process(layout, moe_reference, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, over = LAYOUTS[layout]
    metrics = train(world, moe_flags(prefix, tok, **over), tmp_path / "m.jsonl")
    assert_same_metrics(metrics, moe_reference, layout)
    assert metrics[5]["loss"] < metrics[1]["loss"], "loss should fall over 5 steps"


def test_moe_at_zero3_matches_single_process(moe_reference, tiny_corpus, tmp_path):
    """ZeRO-3 at ep 1, built sharded, with units down to 64 elements: the router's weight is one, and the
    router returns routing rather than a tensor, so no backward hook gathers that weight again; stage 3 keeps
    it gathered until its gradient arrives (before: a crash, or a backward reading released weights)."""
    prefix, tok = tiny_corpus
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 64}}))
    metrics = train(2, moe_flags(prefix, tok, **{"zero-config": ds}), tmp_path / "m.jsonl")
    assert_same_metrics(metrics, moe_reference, "dp2-zero3")


def test_moe_checkpoint_reshards_across_ep(moe_reference, tiny_corpus, tmp_path):
    """Saved at ep2 x tp2 (ZeRO-1 over expert-dp 1), resumed at ep4 (ZeRO-1 over expert-dp 1, dense over dp 4):
    the run goes on as the single process does."""
    prefix, tok = tiny_corpus
    save = tmp_path / "ckpt"
    zero1 = {"use-distributed-optimizer": True}
    first = train(4, moe_flags(prefix, tok, ep=2, tp=2, save=save, **{"sequence-parallel": True, "exit-interval": 2},
                              **zero1), tmp_path / "a.jsonl")
    rest = train(4, moe_flags(prefix, tok, ep=4, load=save, **zero1), tmp_path / "b.jsonl")
    assert sorted(rest) == [3, 4, 5]
    assert_same_metrics({**first, **rest}, moe_reference, "ep2 tp2 -> ep4")
    index = json.load(open(save / "iter_0000002" / "meta.json"))["tensors"]
    assert index["exp_avg/layers.0.mlp.experts.fc1"]["shape"] == [4, 48, 32]  # all experts, whatever the layout


@pytest.mark.parametrize("flags,world,needle", [
    ({"num-experts": 6, "ep": 4}, 4, "--num-experts=6 must be divisible by --expert-model-parallel-size (--ep) 4"),
    ({"ep": 4}, 2, "--expert-model-parallel-size (--ep)=4 must divide the data-parallel size 2"),
    ({"moe-router-topk": 5}, 1, "--moe-router-topk=5 must be between 1 and --num-experts (4)"),
    ({"tp": 2}, 2, "--sequence-parallel=False is required with --num-experts and tensor parallelism"),
    ({"disable-bias-linear": False}, 1, "--disable-bias-linear=False is required with --num-experts"),
    ({"num-experts": None, "ep": 2}, 2, "--expert-model-parallel-size (--ep)=2 needs experts"),
    ({"moe-layer-freq": "[1,0]"}, 1, "--moe-layer-freq=[1, 0] as a pattern needs one 0 or 1 per layer"),
    ({"moe-layer-freq": "often"}, 1, "--moe-layer-freq expects an integer or a list"),
    ({"ep": 2, "zero-config": "configs/zero/zero3.json"}, 2, "ZeRO stage 3 with --expert-model-parallel-size 2"),
    ({"cp": 2, "attention-dropout": False}, 2, "--num-experts with --context-parallel-size 2 is not supported"),
])
def test_bad_moe_flags_fail_before_any_process_group(flags, world, needle, tiny_corpus):
    prefix, tok = tiny_corpus
    flags = {k: (False if v is None else v) for k, v in flags.items()}
    with pytest.raises(ConfigError) as e:
        resolve(moe_flags(prefix, tok, **flags), world)
    assert needle in str(e.value)


def _export_and_compare(rank, world, checkpoint, out_dir):
    """Export a checkpoint with the CLI; (transformers' logits vs megaengine.load_model's: relative error, class)."""
    import torch
    import transformers

    import megaengine
    from megaengine.tools import export_hf
    export_hf.main(["--load", checkpoint, "--output", out_dir, "--no-tokenizer"])
    ours = megaengine.load_model(checkpoint).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = theirs(ids).logits
    return ((ours.full_logits(ids) - ref).abs().max() / ref.abs().max()).item(), type(theirs).__name__


def test_load_hf_mixtral_trains_at_ep_and_exports_back(tiny_corpus, tmp_path):
    """--load-hf of a directory transformers' MixtralForCausalLM wrote: one process and ep2 x tp2 take the same
    steps from the same weights (and not from the seeded init); the ep2 x tp2 checkpoint exports back to a
    MixtralForCausalLM whose logits equal megaengine's."""
    import shutil

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from megaengine.data import Tokenizer
    prefix, tok = tiny_corpus
    torch.manual_seed(3)
    hf_config = MixtralConfig(vocab_size=Tokenizer(tok).vocab_size, hidden_size=32, intermediate_size=24,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=16, rms_norm_eps=1e-5,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    MixtralForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    shutil.copy(tok, tmp_path / "hf" / "tokenizer.model")
    flags = {"moe-layer-freq": 1, "untie-embeddings-and-output-weights": True, "train-iters": 2}
    single = train(1, moe_flags(prefix, tok, **flags, **{"load-hf": tmp_path / "hf"}), tmp_path / "a.jsonl")
    sharded = train(4, moe_flags(prefix, tok, ep=2, tp=2, save=tmp_path / "ckpt", **flags,
                                 **{"sequence-parallel": True, "load-hf": tmp_path / "hf"}), tmp_path / "b.jsonl")
    fresh = train(1, moe_flags(prefix, tok, **flags), tmp_path / "c.jsonl")
    assert_same_metrics(sharded, single, "load-hf ep2 tp2")
    assert abs(single[1]["loss"] - fresh[1]["loss"]) > 1e-3  # the Hugging Face weights were used
    [(error, hf_class)] = run_distributed(_export_and_compare, 1, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert hf_class == "MixtralForCausalLM" and error <= TOL


def _memory_case(rank, world, stage):
    from megaengine import parallel
    from megaengine.models import GPT, GPTConfig
    from megaengine.moe import MoEConfig
    from megaengine.parallel.params import param_info
    from megaengine.zero.optimizer import ZeroOptimizer
    s = parallel.initialize(ep=2)
    config = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64, swiglu=True,
                       add_bias_linear=False, normalization="RMSNorm", position_embedding_type="rope",
                       moe=MoEConfig(num_experts=4, moe_ffn_hidden_size=16))
    model = GPT(config, s.tp_group, ep_group=s.ep_group)
    experts = sum(p.numel() for p in model.parameters() if param_info(p).expert_parallel)
    dense = sum(p.numel() for p in model.parameters()) - experts
    opt = ZeroOptimizer([model], stage=stage, dp_group=s.dp_group, tp_group=s.tp_group,
                        expert_dp_group=s.expert_dp_group, ep_group=s.ep_group)
    return opt.memory_report(), dense, experts, len(opt.buckets)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_shards_expert_state_over_expert_dp(stage):
    """dp 4, ep 2: each rank holds half the experts, whose fp32 master and moments (12 bytes per element) are
    sharded over the 2 ranks holding the same experts, the rest over all 4 (stage 2: the gradients too);
    bucket padding adds at most one element per bucket and shard."""
    for report, dense, experts, buckets in run_distributed(_memory_case, 4, stage):
        per_rank = dense / 4 + experts / 2
        assert 12 * per_rank <= report["optimizer_bytes"] <= 12 * (per_rank + buckets)
        grads = per_rank if stage == 2 else dense + experts
        assert 4 * grads <= report["grad_bytes"] <= 4 * (grads + 4 * buckets)
        assert 4 * (dense + experts) <= report["param_bytes"] <= 4 * (dense + experts + 4 * buckets)


def test_readme_moe_command_resolves():
    """`torchrun --nproc_per_node 4 pretrain_gpt.py --config configs/moe-tiny.json --ep 2 --tp 2`: a valid layout
    (dp 2 of which ep 2, sequence parallel from the preset) and the MoE model the README describes."""
    cfg = resolve(["--config", "configs/moe-tiny.json", "--ep", "2", "--tp", "2"], 4)
    p, moe = cfg.parallel, cfg.model.moe
    assert (p.tp, p.dp, p.ep, p.sequence_parallel) == (2, 2, 2, True)
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_token_dispatcher_type) == (8, 2, "alltoall")
    assert moe.moe_aux_loss_coeff > 0 and "ep 2 [flag]" in cfg.summary()

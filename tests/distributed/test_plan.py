"""The planner (python -m megaengine.plan): parameter, gradient and optimizer bytes equal ZeroOptimizer's
memory_report() exactly at several layouts (dp2 stages 0-3, tp2, pp2 with tied embeddings, bf16 and fp32,
offload); the parameter list it derives from a config is the GPT's own; peak in-flight counts follow the
schedules; the CLI maps flags (preset, --zero-config) onto the same numbers; --search ranks what fits."""
import json

import pytest
import torch

from megaengine.testing import run_distributed

BUCKET, THRESHOLD = 3000, 40
LLAMA = dict(untie_embeddings_and_output_weights=True, swiglu=True, normalization="RMSNorm",
             position_embedding_type="rope", add_bias_linear=False, num_query_groups=2)


def _config(**kw):
    from megaengine.models import GPTConfig
    return GPTConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                     make_vocab_size_divisible_by=8, **kw)


def _memory_worker(rank, world, tp, pp, cp, variants):
    from megaengine import parallel
    from megaengine.models import GPT
    from megaengine.pipeline import layer_ranges
    from megaengine.plan.memory import chunk_params, state_bytes
    from megaengine.zero import ZeroOptimizer
    state = parallel.initialize(tp=tp, pp=pp, cp=cp)
    (layers,) = layer_ranges(4, pp)[state.pp_rank]
    first, last = state.pp_rank == 0, state.pp_rank == pp - 1
    out = []
    for stage, dtype, offload, kw in variants:
        cfg = _config(**kw)
        model = GPT(cfg, state.tp_group, layers=layers, pre_process=first, post_process=last).to(dtype)
        opt = ZeroOptimizer([model], stage=stage, dp_group=state.dp_cp_group, tp_group=state.tp_group,
                            pp_group=state.pp_group, reduce_bucket_size=BUCKET, param_persistence_threshold=THRESHOLD,
                            offload_optimizer=offload)
        if stage == 3 and first and last and not cfg.untie_embeddings_and_output_weights:
            opt.register_external_parameter(model, model.word_embeddings.weight)
        tokens = torch.randint(0, 100, (1, 17), generator=torch.Generator().manual_seed(0))
        x = tokens[:, :-1] if first else torch.randn(16, 1, 32, dtype=dtype, requires_grad=True)
        out_ = model(x, tokens[:, 1:] if last else None)
        out_.float().mean().backward()
        opt.step()
        report = opt.memory_report()
        e = torch.tensor([], dtype=dtype).element_size()
        predicted = state_bytes([chunk_params(cfg, tp, layers, first, last)], stage=stage, dp=state.dp_cp_size,
                                dtype_bytes=e, bucket_size=BUCKET, persistence_threshold=THRESHOLD)
        out.append(((report["param_bytes"], report["grad_bytes"], report["optimizer_bytes"]),
                    (predicted.param_bytes, predicted.grad_bytes, predicted.optimizer_bytes)))
    return out


VARIANTS = [(stage, dtype, False, kw) for stage in range(4) for dtype in (torch.float32, torch.bfloat16)
            for kw in ({}, LLAMA)] + [(2, torch.bfloat16, True, {})]


@pytest.mark.parametrize("world,tp,pp,cp", [(2, 1, 1, 1), (3, 1, 1, 1), (4, 2, 1, 1), (4, 1, 2, 1), (4, 1, 1, 2)],
                         ids=["dp2", "dp3 (padding)", "tp2-dp2", "pp2-dp2", "cp2-dp2"])
def test_state_bytes_equal_memory_report(world, tp, pp, cp):
    for rank, rows in enumerate(run_distributed(_memory_worker, world, tp, pp, cp, VARIANTS)):
        for variant, (reported, predicted) in zip(VARIANTS, rows):
            assert reported == predicted, (rank, variant[:3], bool(variant[3]), reported, predicted)


def _params_worker(rank, world, kw):
    from megaengine import parallel
    from megaengine.models import GPT
    from megaengine.parallel.params import param_info
    from megaengine.plan.memory import chunk_params
    state = parallel.initialize(tp=world)
    cfg = _config(**kw)
    got = []
    for layers, first, last in (((0, 4), True, True), ((0, 2), True, False), ((2, 4), False, True)):
        model = GPT(cfg, state.tp_group, layers=layers, pre_process=first, post_process=last)
        real = [(n, p.numel()) for n, p in model.named_parameters()]
        listed = [(p.name, p.numel) for p in chunk_params(cfg, world, layers, first, last)]
        tied = [p.name for p in chunk_params(cfg, world, layers, first, last) if p.tied]
        marked = [n for n, p in model.named_parameters() if param_info(p).tied]
        got.append((real == listed, tied == marked))
    return got


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["gpt2", "llama"])
def test_listed_parameters_are_the_models(kw):
    for rows in run_distributed(_params_worker, 2, kw):
        assert rows == [(True, True)] * 3


def test_peak_held_follows_the_schedules():
    from megaengine.pipeline.schedules import build
    from megaengine.pipeline.simulate import peak_inflight
    from megaengine.plan.predict import peak_held
    for name, p, m, v in (("1f1b", 4, 8, 1), ("gpipe", 4, 8, 1), ("interleaved", 4, 8, 2)):
        for rank, actions in enumerate(build(name, p, m, v)):
            assert peak_held(actions, [1.0] * v) == peak_inflight(actions)
    # zero bubble: a micro-batch's graph stays from F until its W (B keeps it for W)
    one_f_one_b, zb = build("1f1b", 4, 8), build("zb-h1", 4, 8)
    assert [peak_held(a, [1.0]) for a in one_f_one_b] == [4, 3, 2, 1]
    assert [peak_held(a, [1.0]) for a in zb] == [4, 4, 4, 4]


def _plan_json(argv, capsys):
    from megaengine.plan.__main__ import main
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_maps_flags_and_zero_json_onto_the_optimizer(capsys):
    """configs/zero/zero2.json has reduce_bucket_size "auto" (= hidden^2) and stage 2; bf16 "auto" follows
    --bf16. The JSON numbers are those of state_bytes with exactly those settings."""
    from megaengine.pipeline import layer_ranges
    from megaengine.plan.memory import chunk_params, state_bytes
    flags = ["--config", "configs/gpt-tiny.json", "--tp", "2", "--pp", "2", "--world-size", "8", "--bf16",
             "--zero-config", "configs/zero/zero2.json", "--micro-batch-size", "2", "--global-batch-size", "16"]
    r = _plan_json(flags, capsys)
    from megaengine.plan.layout import from_config, parse
    cfg, layout = from_config(parse(flags)[0])
    assert (layout.zero_stage, layout.bucket_size, layout.dtype_bytes, layout.dp) == (2, cfg.hidden_size ** 2, 2, 2)
    per_rank = []
    for rank in range(2):
        (layers,) = layer_ranges(cfg.num_layers, 2)[rank]
        s = state_bytes([chunk_params(cfg, 2, layers, rank == 0, rank == 1)], stage=2, dp=2, dtype_bytes=2,
                        bucket_size=cfg.hidden_size ** 2)
        per_rank.append((s.param_bytes, s.grad_bytes, s.optimizer_bytes))
    assert (r["param_bytes"], r["grad_bytes"], r["optimizer_bytes"]) == per_rank[r["pipeline_rank"]]
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes_per_microbatch",
                "peak_activation_bytes", "total_bytes"):
        assert r[key] > 0, key
    assert r["total_bytes"] >= r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["peak_activation_bytes"]


def test_recomputation_lowers_the_planned_activations(capsys):
    base = ["--config", "configs/llama-7b.json", "--vocab-size", "32000", "--world-size", "8", "--tp", "8",
            "--global-batch-size", "8"]
    none = _plan_json(base, capsys)
    selective = _plan_json(base + ["--recompute-activations"], capsys)
    full = _plan_json(base + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                              "--recompute-num-layers", "1"], capsys)
    assert full["peak_activation_bytes"] < none["peak_activation_bytes"] / 10
    assert full["recompute_bytes"] > 0 and none["recompute_bytes"] == 0
    # with flash attention nothing s x s is saved, so selective recomputation buys nothing here
    assert selective["peak_activation_bytes"] >= none["peak_activation_bytes"] * 0.95


def test_search_lists_fitting_layouts_fastest_first(capsys):
    from megaengine.plan.__main__ import main
    assert main(["--config", "configs/gpt-1.3b.json", "--world-size", "8", "--gpu-memory", "24",
                 "--global-batch-size", "64", "--search", "--json", "--top", "50"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["total_bytes"] <= 24 * 2**30 for r in rows)
    assert [r["step_seconds"] for r in rows] == sorted(r["step_seconds"] for r in rows)
    assert all(r["layout"]["tp"] * r["layout"]["pp"] * r["layout"]["dp"] == 8 for r in rows)


@pytest.mark.parametrize("argv,flag", [
    (["--config", "configs/gpt-tiny.json", "--tp", "3", "--world-size", "6"], "--num-attention-heads"),
    (["--config", "configs/gpt-tiny.json", "--world-size", "6", "--tp", "4"], "--world-size"),
    (["--config", "configs/gpt-tiny.json", "--recompute-granularity", "full"], "--recompute-method"),
    (["--num-layers", "2"], "--hidden-size"),
    (["--config", "configs/moe-tiny.json", "--world-size", "4"], "--num-experts"),
])
def test_bad_flags_are_config_errors(argv, flag, capsys):
    from megaengine.plan.__main__ import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err, err


PLAN_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--vocab-size", "100",
              "--make-vocab-size-divisible-by", "8", "--device", "cpu", "--recompute-granularity", "full",
              "--recompute-method", "block", "--recompute-num-layers", "1"]


def _counted_worker(rank, world, flags):
    from megaengine import parallel
    from megaengine.context_parallel.layout import split_for_rank
    from megaengine.models import GPT
    from megaengine.plan.layout import from_config, parse
    from megaengine.plan.measure import chunk_saved_bytes
    config, layout = from_config(parse(flags)[0])
    state = parallel.initialize(cp=layout.cp)
    model = GPT(config, state.tp_group, cp_group=state.cp_group, cp_comm_type=layout.cp_comm_type)
    model = model.to(torch.bfloat16 if layout.dtype_bytes == 2 else torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (layout.micro_batch, config.seq_length + 1), generator=g)
    x, y = (split_for_rank(t, state.cp_size, state.cp_rank) for t in (tokens[:, :-1], tokens[:, 1:]))
    return chunk_saved_bytes(model, x, y)


@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--cp", "2", "--attention-dropout", "0"]],
                         ids=["fp32", "bf16", "cp2"])
def test_cli_activations_per_microbatch_match_counted(extra, capsys):
    planned = _plan_json(PLAN_FLAGS + extra, capsys)["activation_bytes_per_microbatch"]
    world = 2 if "--cp" in extra else 1
    for counted in run_distributed(_counted_worker, world, PLAN_FLAGS + extra):
        assert abs(planned / counted - 1) <= 0.05, (planned, counted)

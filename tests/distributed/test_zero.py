"""ZeRO stages 0-3 against one-process torch.optim.AdamW; memory, communication volume and fp16 overflow."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from megaengine.parallel import comm
from megaengine.testing import run_distributed
from megaengine.zero import DynamicLossScaler, ZeroOptimizer

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS, MICRO, BATCH, CLIP = 3, 2, 8, 0.05


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def batches(steps=STEPS, micro=MICRO, batch=BATCH, d_in=8, d_out=4):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)) for _ in range(micro)]
            for _ in range(steps)]


def reference(model: nn.Module, data, clip=CLIP):
    """One process, the whole batch: AdamW without decay on ndim < 2, clip_grad_norm_."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.0}], lr=HP["lr"],
                            betas=HP["betas"], eps=HP["eps"], weight_decay=HP["weight_decay"])
    norms = []
    for micro in data:
        opt.zero_grad()
        for x, y in micro:
            (F.mse_loss(model(x), y) / len(micro)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], norms


def train(opt, model, data, rank, world, forward=None):
    forward = forward or model
    norms = []
    for micro in data:
        opt.zero_grad()
        for i, (x, y) in enumerate(micro):
            opt.set_is_last_microbatch(i == len(micro) - 1)
            n = x.shape[0] // world
            out = forward(x[rank * n:(rank + 1) * n])
            opt.scale_loss(F.mse_loss(out, y[rank * n:(rank + 1) * n]) / len(micro)).backward()
        norms.append(opt.step()[0])
    return norms


VARIANTS = [
    dict(stage=0),
    dict(stage=0, overlap_comm=False, prescale_gradients=True),
    dict(stage=1),
    dict(stage=1, overlap_comm=False, reduce_scatter=False),
    dict(stage=2),
    dict(stage=2, offload_optimizer=True, overlap_comm=False),
    dict(stage=3, param_persistence_threshold=20),
    dict(stage=3, param_persistence_threshold=0, prefetch_bucket_size=1),
]


def _stages_worker(rank, world):
    out = []
    for kw in VARIANTS:
        model = mlp()
        opt = ZeroOptimizer([model], clip_grad=CLIP, reduce_bucket_size=100, **HP, **kw)
        norms = train(opt, model, batches(), rank, world)
        with opt.gathered_params():
            out.append(([p.detach().clone() for p in model.parameters()], norms, opt.master.device.type))
    return out


def _close(a, b, rtol=1e-5):
    return ((a - b).abs().max() / b.abs().max()).item() <= rtol


@pytest.mark.parametrize("world", [2, 4])
def test_stages_match_single_process_adamw(world):
    ref_params, ref_norms = reference(mlp(), batches())
    results = run_distributed(_stages_worker, world)
    for rank_results in results:
        for kw, (params, norms, device) in zip(VARIANTS, rank_results):
            assert all(_close(p, r) for p, r in zip(params, ref_params)), kw
            assert all(abs(n - r) <= 1e-5 * r for n, r in zip(norms, ref_norms)), (kw, norms, ref_norms)
            assert device == "cpu"


def _missing_no_sync_worker(rank, world):
    model = mlp()
    _opt = ZeroOptimizer([model], stage=1, overlap_comm=True, **HP)  # kept alive: its hooks are under test
    x, y = batches(1, 1)[0][0]
    F.mse_loss(model(x), y).backward()  # the default: every micro-batch is the last
    try:
        F.mse_loss(model(x), y).backward()
    except RuntimeError as e:
        return "set_is_last_microbatch" in str(e)
    return False


def test_second_microbatch_without_no_sync_is_an_error():
    assert all(run_distributed(_missing_no_sync_worker, 2))


def _tp_model(group, w1, w2):
    from megaengine.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    return nn.Sequential(ColumnParallelLinear(8, 16, group=group, init_method=lambda t: t.copy_(w1)), nn.GELU(),
                         RowParallelLinear(16, 4, group=group, init_method=lambda t: t.copy_(w2)), nn.LayerNorm(4))


def _tp_worker(rank, world):
    from megaengine import parallel
    ps = parallel.initialize(tp=2, pp=1)
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(16, 8, generator=g) * 0.3, torch.randn(4, 16, generator=g) * 0.3
    dense = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.LayerNorm(4))
    with torch.no_grad():
        dense[0].weight.copy_(w1), dense[0].bias.zero_(), dense[2].weight.copy_(w2), dense[2].bias.zero_()
    ref_params, ref_norms = reference(dense, batches())
    ok = []
    for stage in (0, 1, 2, 3):
        model = _tp_model(ps.tp_group, w1, w2)
        opt = ZeroOptimizer([model], stage=stage, clip_grad=CLIP, reduce_bucket_size=64, dp_group=ps.dp_group,
                            tp_group=ps.tp_group, pp_group=ps.pp_group, param_persistence_threshold=8, **HP)
        norms = train(opt, model, batches(), ps.dp_rank, ps.dp_size)
        t = ps.tp_rank
        expected = [ref_params[0].chunk(2, 0)[t], ref_params[1].chunk(2, 0)[t], ref_params[2].chunk(2, 1)[t],
                    ref_params[3], ref_params[4], ref_params[5]]
        with opt.gathered_params():
            ok.append(all(_close(p, e) for p, e in zip(model.parameters(), expected))
                      and all(abs(n - r) <= 1e-5 * r for n, r in zip(norms, ref_norms)))
    return ok


def test_tensor_parallel_2_by_data_parallel_2_matches_dense_reference():
    assert run_distributed(_tp_worker, 4) == [[True] * 4] * 4


def wide_mlp(dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)]).to(dtype)


def _one_step(opt, model, rank, world, x=None):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, generator=g) if x is None else x
    n = x.shape[0] // world
    opt.zero_grad()
    loss = model(x[rank * n:(rank + 1) * n].to(next(iter(model.parameters())).dtype)).float().pow(2).mean()
    opt.scale_loss(loss).backward()
    return opt.step()


def _memory_worker(rank, world):
    reports = []
    for stage in (0, 1, 2, 3):
        model = wide_mlp()
        opt = ZeroOptimizer([model], stage=stage, param_persistence_threshold=0, reduce_bucket_size=2000, **HP)
        _one_step(opt, model, rank, world)
        reports.append(opt.memory_report())
    return reports


def test_memory_report_matches_zero_paper_formulas():
    """bf16 params, fp32 grads (fp32 accumulation) and Adam (12 bytes) per param, as in REFERENCE.md."""
    world, P = 4, 4 * (32 * 32 + 32)
    expected = {0: (2, 4, 12), 1: (2, 4, 12 / world), 2: (2, 4 / world, 12 / world),
                3: (2 / world, 4 / world, 12 / world)}
    for reports in run_distributed(_memory_worker, world):
        for stage, report in enumerate(reports):
            measured = (report["param_bytes"], report["grad_bytes"], report["optimizer_bytes"])
            for got, per_param in zip(measured, expected[stage]):
                assert abs(got / (per_param * P) - 1) <= 0.05, (stage, measured, expected[stage])


def _comm_worker(rank, world):
    out = []
    for stage in (0, 1, 2, 3):
        model = wide_mlp()
        opt = ZeroOptimizer([model], stage=stage, param_persistence_threshold=0, reduce_bucket_size=2000, **HP)
        _one_step(opt, model, rank, world)  # warm-up: stage 3 records its prefetch order
        comm.comm_stats.reset()
        _one_step(opt, model, rank, world)
        out.append((dict(comm.comm_stats.volume), sum(b.numel for b in opt.buckets), len(opt.buckets)))
    return out


def test_comm_volume_per_step_matches_theory():
    """Ring model per rank, f = (n-1)/n, Q = padded parameter count: all-reduce of fp32 grads 2 x 4Q f
    (stage 0); reduce-scatter 4Q f + all-gather 2Q f (stages 1, 2: 2Q elements); stage 3 gathers twice
    (forward, backward): 3Q elements. Every stage adds one 2-float all-reduce for the norm and overflow flag."""
    world, P = 4, 4 * (32 * 32 + 32)
    f = (world - 1) / world
    for per_rank in run_distributed(_comm_worker, world):
        for stage, (volume, Q, n_buckets) in enumerate(per_rank):
            assert P <= Q <= P + n_buckets * (world - 1)
            norm = 2 * 8 * f  # the [norm^2, overflow] pair
            want = {0: {"all_reduce": 2 * 4 * Q * f + norm},
                    1: {"reduce_scatter": 4 * Q * f, "all_gather": 2 * Q * f, "all_reduce": norm},
                    2: {"reduce_scatter": 4 * Q * f, "all_gather": 2 * Q * f, "all_reduce": norm},
                    3: {"reduce_scatter": 4 * Q * f, "all_gather": 2 * 2 * Q * f, "all_reduce": norm}}[stage]
            assert {k: v for k, v in volume.items() if v} == pytest.approx(want, rel=1e-12), stage
            elements = volume.get("reduce_scatter", 0) / 4 + volume.get("all_gather", 0) / 2 \
                + ((volume["all_reduce"] - norm) / 4 if stage == 0 else 0)
            assert elements == pytest.approx((3 if stage == 3 else 2) * Q * f)


def _fp16_worker(rank, world, stage):
    model = wide_mlp(torch.float16)
    scaler = DynamicLossScaler(initial_scale_power=8, loss_scale_window=2, hysteresis=1)
    opt = ZeroOptimizer([model], stage=stage, loss_scaler=scaler, **HP)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float16)
    opt.scale_loss(model(x).float().pow(2).mean()).backward()
    opt.finish_grad_sync()
    if rank == 1:  # an overflow that only this rank sees: the last gradient element it holds
        grads = [g for g in map(opt.main_grad, model.parameters()) if g.numel()]
        grads[-1][-1] = float("inf")
    norm, skipped = opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    history = [(skipped, scaler.scale, unchanged)]
    for _ in range(3):
        _, skipped = _one_step(opt, model, rank, world)
        history.append((skipped, scaler.scale))
    return history, opt.step_count


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_overflow_on_one_rank_skips_everywhere_and_scale_recovers(stage):
    for history, steps in run_distributed(_fp16_worker, 2, stage):
        assert history[0] == (True, 128.0, True)
        # DeepSpeed: the scale doubles once loss_scale_window (2) steps after the overflow step are clean.
        assert history[1:] == [(False, 128.0), (False, 128.0), (False, 256.0)]
        assert steps == 3


def test_dynamic_loss_scaler_hysteresis_and_floor():
    s = DynamicLossScaler(initial_scale_power=2, loss_scale_window=100, hysteresis=2, min_loss_scale=2)
    s.update(True)
    assert s.scale == 4.0  # the first overflow only uses up hysteresis
    s.update(True)
    assert s.scale == 2.0
    s.update(True)
    assert s.scale == 2.0  # never below min_loss_scale


ENGINE_CONFIG = {
    "train_batch_size": BATCH * MICRO, "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": CLIP,
    "optimizer": {"type": "AdamW", "params": {"lr": HP["lr"], "betas": list(HP["betas"]), "eps": HP["eps"],
                                              "weight_decay": HP["weight_decay"]}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 100, "overlap_comm": True},
}


def _engine_run(engine, data, rank, world):
    for micro in data:
        for x, y in micro:
            n = x.shape[0] // world
            engine.backward(F.mse_loss(engine(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]))
            engine.step()


def _engine_worker(rank, world, directory, stage):
    from megaengine.zero import initialize
    config = {**ENGINE_CONFIG, "zero_optimization": {**ENGINE_CONFIG["zero_optimization"], "stage": stage}}
    data = batches()
    engine = initialize(model=mlp(), config=config, cli={"micro_batch_size": BATCH // world})
    _engine_run(engine, data[:2], rank, world)
    engine.save_checkpoint(directory, client_state={"note": "two steps"})
    _engine_run(engine, data[2:], rank, world)
    with engine.optimizer.gathered_params():
        straight = [p.detach().clone() for p in engine.module.parameters()]
    resumed = initialize(model=nn.Sequential(*mlp()), config=config, cli={"micro_batch_size": BATCH // world})
    _, client = resumed.load_checkpoint(directory)
    _engine_run(resumed, data[2:], rank, world)
    with resumed.optimizer.gathered_params():
        again = [p.detach().clone() for p in resumed.module.parameters()]
    return (straight, all(torch.equal(a, b) for a, b in zip(straight, again)), client, engine.global_steps,
            engine.config.gradient_accumulation_steps)


@pytest.mark.parametrize("stage", [1, 3])
def test_engine_matches_reference_and_resumes_from_checkpoint(stage, tmp_path):
    ref_params, _ = reference(mlp(), batches())
    for straight, resumed_equal, client, steps, gas in run_distributed(_engine_worker, 2, str(tmp_path), stage):
        assert gas == MICRO and steps == STEPS
        assert all(_close(p, r) for p, r in zip(straight, ref_params))
        assert resumed_equal and client == {"note": "two steps"}
    # One checkpoint format for engines and pretrain_gpt.py: the pointer, then an index and a shard per rank.
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert sorted(p.name for p in (tmp_path / "iter_0000002").iterdir()) == ["meta.json", "shard_00000.pt",
                                                                             "shard_00001.pt"]


def _engine_save(rank, world, directory, stage):
    from megaengine.zero import initialize
    config = {**ENGINE_CONFIG, "zero_optimization": {**ENGINE_CONFIG["zero_optimization"], "stage": stage}}
    engine = initialize(model=mlp(), config=config, cli={"micro_batch_size": BATCH // world})
    _engine_run(engine, batches()[:2], rank, world)
    engine.save_checkpoint(directory)


def _engine_resume(rank, world, directory, stage):
    from megaengine.zero import initialize
    config = {**ENGINE_CONFIG, "zero_optimization": {**ENGINE_CONFIG["zero_optimization"], "stage": stage}}
    engine = initialize(model=nn.Sequential(*mlp()), config=config, cli={"micro_batch_size": BATCH // world})
    engine.load_checkpoint(directory)
    _engine_run(engine, batches()[2:], rank, world)
    with engine.optimizer.gathered_params():
        return [p.detach().clone() for p in engine.module.parameters()], engine.global_steps


@pytest.mark.parametrize("saved_at,resumed_at", [((2, 1), (4, 3)), ((4, 3), (1, 0)), ((2, 2), (2, 0))])
def test_engine_checkpoint_loads_at_another_dp_size_and_stage(saved_at, resumed_at, tmp_path):
    """Saved at (dp, stage), resumed at another: the parameters end where one process's AdamW ends."""
    ref_params, _ = reference(mlp(), batches())
    run_distributed(_engine_save, saved_at[0], str(tmp_path), saved_at[1])
    for params, steps in run_distributed(_engine_resume, resumed_at[0], str(tmp_path), resumed_at[1]):
        assert steps == STEPS
        assert all(_close(p, r) for p, r in zip(params, ref_params))


def _old_format_worker(rank, world, directory):
    from megaengine.parallel import ConfigError
    from megaengine.zero import initialize
    engine = initialize(model=mlp(), config=ENGINE_CONFIG, cli={"micro_batch_size": BATCH})
    try:
        engine.load_checkpoint(directory)
    except ConfigError as e:
        return str(e)


def test_old_engine_format_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "global_step2").mkdir()
    torch.save({"module": {}}, tmp_path / "global_step2" / "rank00000.pt")
    (tmp_path / "latest").write_text("global_step2")
    message = run_distributed(_old_format_worker, 1, str(tmp_path))[0]
    assert "old per-rank format" in message and str(tmp_path) in message


def _gpt_worker(rank, world):
    from megaengine import parallel
    from megaengine.models.gpt import GPT, GPTConfig
    ps = parallel.initialize(tp=1, pp=1)
    # No linear biases: the key bias gets a zero gradient up to rounding, which Adam would amplify to lr-sized
    # steps in either direction, so it cannot be compared between reduction orders.
    config = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=256,
                       hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False)
    tokens = torch.randint(0, 256, (2 * world, 17), generator=torch.Generator().manual_seed(0))
    stray = GPT(config, ps.tp_group)  # stage 3 without announcing the tied weight: an error, not a wrong result
    ZeroOptimizer([stray], stage=3, dp_group=ps.dp_group, param_persistence_threshold=32)
    try:
        stray(tokens[:1, :-1], tokens[:1, 1:])
        return False
    except RuntimeError:
        pass
    results = []
    for stage in (0, 3):
        model = GPT(config, ps.tp_group)
        opt = ZeroOptimizer([model], stage=stage, clip_grad=1.0, dp_group=ps.dp_group, tp_group=ps.tp_group,
                            pp_group=ps.pp_group, reduce_bucket_size=5000, param_persistence_threshold=32,
                            prefetch_bucket_size=3000, **HP)
        opt.register_external_parameter(model, model.word_embeddings.weight)  # the tied output layer
        for _ in range(3):
            opt.zero_grad()
            for i in range(2):
                opt.set_is_last_microbatch(i == 1)
                t = tokens[rank * 2 + i:rank * 2 + i + 1]
                (model(t[:, :-1], t[:, 1:]).mean() / 2).backward()
            opt.step()
        with opt.gathered_params():
            results.append([p.detach().clone() for p in model.parameters()])
    return all(_close(a, b) for a, b in zip(*results))


def test_stage3_gpt_with_tied_embeddings_matches_stage0():
    assert all(run_distributed(_gpt_worker, 2))


def _unsupported_worker(rank, world):
    from megaengine import parallel
    from megaengine.parallel import ConfigError
    ps = parallel.initialize(tp=1, pp=2)
    messages = []
    for kw in (dict(stage=3), dict(stage=0, offload_optimizer=True), dict(stage=5)):
        try:
            ZeroOptimizer([mlp()], dp_group=ps.dp_group, pp_group=ps.pp_group, **kw)
        except ConfigError as e:
            messages.append(str(e))
    return messages


def test_unsupported_combinations_are_config_errors():
    for messages in run_distributed(_unsupported_worker, 2):
        assert len(messages) == 3
        assert "stage=3" in messages[0] and "pipeline" in messages[0]
        assert "offload_optimizer" in messages[1] and "stage" in messages[2]

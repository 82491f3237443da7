"""No rank holds the whole model (issue 12, section 2).

- The seeded init draws only the rows of a shard (per-row-block generators) and every piece equals the slice
  of the full tensor.
- A GPT built under zero_init (tp2 x dp2) holds only its 1/dp shards after the build, and gathered they are the
  weights of the GPT built whole. A custom nn.Module built under megaengine.zero_init and trained through
  megaengine.initialize (bf16) follows the curve of the same module built whole, exactly.
- ZeRO-3 with pp 2 x dp 2, 1F1B and ZB-H1: each unit is gathered exactly twice per micro-batch (forward,
  backward; W regathers a unit only if a forward released it after B, which this schedule never does) and its
  gradient reduce-scattered once.
  Loss-curve parity of these layouts through the trainer is in test_training.py (pp2-dp2-zero3[-zb-h1]).
- A GPT of 150M parameters trains one iteration at ZeRO-3 dp 8 through pretrain_gpt's trainer, and each
  rank's peak resident memory above that of the same run with a tiny model stays below the full model's fp32
  weight bytes.
"""
import ctypes
import json
import sys

import pytest
import torch

from megaengine.testing import run_distributed


def test_seeded_init_draws_only_the_pieces_it_returns(monkeypatch):
    from megaengine.tensor_parallel import init
    f = init.seeded_init(5, "layers.0.mlp.fc1", 0.02, rows=250)
    full = f.piece((300, 40))
    assert full[250:].abs().sum() == 0 and full[:250].std() > 0.01  # vocabulary padding is zero
    rows, cols = [(64, 128), (200, 230)], (10, 20)
    assert torch.equal(f.piece((300, 40), rows, cols), torch.cat([full[64:128], full[200:230]])[:, 10:20])
    t = torch.empty(300, 40)
    f(t)
    assert torch.equal(t, full)
    drawn = []
    block = init.SeededInit._block
    monkeypatch.setattr(init.SeededInit, "_block", lambda self, i, w: drawn.append(i) or block(self, i, w))
    f.piece((256, 40), [(64, 128)])  # a column-parallel shard at tp 4: its one block
    assert drawn == [1]
    drawn.clear()
    f.piece((256, 40), None, (0, 10))  # a row-parallel shard: every block, one at a time
    assert drawn == [0, 1, 2, 3]


GPT_KW = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
              make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)


def _gpt_worker(rank, world):
    from megaengine import parallel, zero_init
    from megaengine.models import GPT, GPTConfig
    from megaengine.zero import ZeroOptimizer
    state = parallel.initialize(tp=2)
    cfg = GPTConfig(**GPT_KW)
    whole = GPT(cfg, state.tp_group)
    with zero_init(state.dp_group, param_persistence_threshold=64, broadcast=False):
        sharded = GPT(cfg, state.tp_group)
    kept = sum(p.numel() for p in sharded.parameters())  # what the build left whole: the small ones
    small = sum(p.numel() for p in whole.parameters() if p.numel() <= 64)
    opt = ZeroOptimizer([sharded], stage=3, dp_group=state.dp_group, tp_group=state.tp_group,
                        param_persistence_threshold=64)
    opt.register_external_parameter(sharded, sharded.word_embeddings.weight)
    with opt.gathered_params():
        same = all(torch.equal(a, b) for a, b in zip(sharded.parameters(), whole.parameters()))
    return kept == small, same


def test_zero_init_gpt_is_the_whole_gpt_sharded():
    assert run_distributed(_gpt_worker, 4) == [(True, True)] * 4


def _custom_worker(rank, world, sharded):
    import megaengine
    from torch import nn
    torch.manual_seed(0)
    with megaengine.zero_init(param_persistence_threshold=0, enabled=sharded):
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    empty = all(p.numel() == 0 for p in model.parameters())
    engine = megaengine.initialize(model, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                                           "bf16": {"enabled": True},
                                           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    g = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(3):
        x, y = torch.randn(4, 16, generator=g), torch.randn(4, 4, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return empty, losses


def test_custom_module_under_zero_init_trains_as_built_whole():
    whole = run_distributed(_custom_worker, 2, False)
    sharded = run_distributed(_custom_worker, 2, True)
    assert [e for e, _ in sharded] == [True, True] and [e for e, _ in whole] == [False, False]
    assert [losses for _, losses in sharded] == [losses for _, losses in whole]


MICRO = 4


def _pipeline_worker(rank, world, schedule):
    from megaengine import parallel, zero_init
    from megaengine.models import GPT, GPTConfig
    from megaengine.parallel import comm
    from megaengine.pipeline import build, run_pipeline
    from megaengine.zero import ZeroOptimizer
    state = parallel.initialize(pp=2)
    cfg, r = GPTConfig(**GPT_KW, untie_embeddings_and_output_weights=True), state.pp_rank
    with zero_init(state.dp_group, param_persistence_threshold=64, broadcast=False):
        model = GPT(cfg, state.tp_group, layers=(r, r + 1), pre_process=r == 0, post_process=r == 1)
    opt = ZeroOptimizer([model], stage=3, dp_group=state.dp_group, pp_group=state.pp_group,
                        param_persistence_threshold=64, prefetch_bucket_size=2000)
    units = sum(u.numel * u.data.element_size() for u in opt.gatherer.units)
    g = torch.Generator().manual_seed(3 + state.dp_rank)
    volumes = []
    for _ in range(2):  # the first step traces the order the prefetch follows
        micro = [torch.randint(0, 100, (2, 17), generator=g) for _ in range(MICRO)]

        def step(c, module, x, mb):
            t = micro[mb]
            out = module(t[:, :-1] if r == 0 else x, t[:, 1:] if r == 1 else None)
            return out.mean() / MICRO if r == 1 else out
        opt.zero_grad()
        comm.comm_stats.reset()
        opt.set_is_last_microbatch(False)
        run_pipeline(build(schedule, 2, MICRO)[r], [model], pp_group=state.pp_group, forward_step=step,
                     num_microbatches=MICRO, tensor_shape=(16, 2, 32), dtype=torch.float32, device=state.device,
                     prefetch=opt.prefetch)
        opt.finish_grad_sync()
        volumes.append((comm.comm_stats.bytes.get("all_gather", 0) / (units * MICRO),
                        comm.comm_stats.bytes.get("reduce_scatter", 0)))
        opt.step()
    grads = sum(u.numel * 4 for u in opt.gatherer.units)
    return [(gathers, scattered >= grads * MICRO) for gathers, scattered in volumes]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_zero3_in_a_pipeline_gathers_per_microbatch(schedule):
    for rows in run_distributed(_pipeline_worker, 4, schedule):
        for gathers, reduced in rows:
            assert reduced
            assert gathers == 2.0, (schedule, rows)


def _peak_rss_worker(rank, world, argv):
    """pretrain_gpt's trainer; returns (exit code, peak resident bytes above the start: once the model is
    built, and over the whole run)."""
    # glibc's dynamic mmap threshold keeps freed blocks of up to 32 MiB in the heap, so resident memory would
    # count memory already freed; a fixed threshold (as MALLOC_MMAP_THRESHOLD_=65536 does) returns it.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts from here
    start = _status("VmRSS")
    from megaengine.training import trainer
    build, built = trainer.build_model_chunks, []

    def build_and_measure(cfg, state):
        chunks = build(cfg, state)
        built.append(_status("VmHWM") - start)
        return chunks
    trainer.build_model_chunks = build_and_measure
    return trainer.main(argv), built[0], _status("VmHWM") - start


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets glibc's mmap threshold")
def test_150m_gpt_at_zero3_dp8_never_holds_the_model(tiny_corpus, tmp_path):
    from megaengine.models import GPTConfig, count_parameters
    prefix, tok = tiny_corpus
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                                    "stage3_param_persistence_threshold": "auto",
                                                    "reduce_bucket_size": "auto"}}))
    base = ["--data-path", prefix, "--tokenizer-model", tok, "--split", "90,10,0", "--num-attention-heads", "8",
            "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "1",
            "--lr", "1e-4", "--eval-iters", "0", "--sample-tokens", "0", "--bf16", "--zero-config", str(ds)]
    shapes = {"tiny": (2, 64), "150M": (12, 1024)}
    peaks = {}
    for name, (layers, hidden) in shapes.items():
        out = run_distributed(_peak_rss_worker, 8, base + ["--num-layers", str(layers), "--hidden-size", str(hidden)],
                              timeout=600)
        assert [code for code, _, _ in out] == [0] * 8
        peaks[name] = [(built, peak) for _, built, peak in out]
    params = count_parameters(GPTConfig(num_layers=12, hidden_size=1024, num_attention_heads=8, seq_length=16,
                                        vocab_size=512), 1)["total"]
    assert 145e6 < params < 155e6
    built, above = ([big[i] - small[i] for big, small in zip(peaks["150M"], peaks["tiny"])] for i in (0, 1))
    # The build keeps the 1/8 bf16 shard (about params / 4 bytes) plus one module's transient fp32 weights.
    assert max(built) < params, (built, params)
    # The iteration adds the fp32 master, moments and gradient shard, and the gathered units.
    assert max(above) < 4 * params, (above, 4 * params)

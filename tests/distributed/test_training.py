"""End-to-end training through megaengine.training.main on gloo ranks: layouts agree, resume is exact.

Losses are read back from the metrics JSON lines (logged every iteration). Bound: relative difference
<= 1e-5 per iteration (fp32 on CPU).
"""
import json

import pytest

from megaengine.testing import run_distributed

TOL = 1e-5


def model_flags(prefix, tokenizer, **over):
    flags = {"num-layers": 8, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
             "micro-batch-size": 2, "global-batch-size": 8, "train-iters": 5, "lr": 3e-3, "lr-warmup-iters": 2,
             "hidden-dropout": 0.0, "attention-dropout": 0.0, "make-vocab-size-divisible-by": 8,
             "log-interval": 1, "eval-interval": 1000, "eval-iters": 0, "sample-tokens": 0, "seed": 7}
    flags.update(over)
    argv = ["--data-path", prefix, "--tokenizer-model", tokenizer, "--split", "90,10,0"]
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not False:
            argv += [f"--{k}", str(v)]
    return argv


def _main(rank, world, argv):
    from megaengine.training.trainer import main
    return main(argv)


def train(world, argv, metrics, main=_main):
    codes = run_distributed(main, world, argv + ["--metrics-file", str(metrics)], timeout=300)
    assert codes == [0] * world, codes
    return {r["iteration"]: r for r in map(json.loads, open(metrics)) if "loss" in r}


def assert_same_losses(a, b, label):
    assert a.keys() == b.keys(), (label, a.keys(), b.keys())
    for it in a:
        rel = abs(a[it]["loss"] - b[it]["loss"]) / abs(b[it]["loss"])
        assert rel <= TOL, f"{label}: iteration {it} loss {a[it]['loss']} vs {b[it]['loss']} (rel {rel:.1e})"


LAYOUTS = {
    "tp2-dp2": (4, {"tp": 2}),
    "tp4": (4, {"tp": 4}),
    "tp2-sp-dp2": (4, {"tp": 2, "sequence-parallel": True}),
    "dp2-zero1": (2, {"use-distributed-optimizer": True}),
    "pp2": (2, {"pp": 2}),
    "tp2-pp2": (4, {"tp": 2, "pp": 2}),
    "tp2-pp2-dp2": (8, {"tp": 2, "pp": 2}),
    "pp4-interleaved-v2": (4, {"pp": 4, "num-layers-per-virtual-pipeline-stage": 1}),
    "pp2-zb-h1": (2, {"pp": 2, "pipeline-schedule": "zb-h1"}),
    "tp2-pp2-sp": (4, {"tp": 2, "pp": 2, "sequence-parallel": True}),
    "pp2-gpipe-zero1": (4, {"pp": 2, "pipeline-schedule": "gpipe", "use-distributed-optimizer": True}),
}


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    prefix, tok = tiny_corpus
    return train(1, model_flags(prefix, tok), tmp_path_factory.mktemp("ref") / "m.jsonl")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_five_steps_match_single_process(layout, reference, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, over = LAYOUTS[layout]
    losses = train(world, model_flags(prefix, tok, **over), tmp_path / "m.jsonl")
    assert_same_losses(losses, reference, layout)
    assert losses[5]["loss"] < losses[1]["loss"], "loss should fall over 5 steps"


def test_resume_reproduces_uninterrupted_run(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    flags = dict(tp=2, **{"train-iters": 6, "hidden-dropout": 0.1})  # dropout: RNG state must resume too
    full = train(4, model_flags(prefix, tok, **flags), tmp_path / "full.jsonl")
    save = tmp_path / "ckpt"
    first = train(4, model_flags(prefix, tok, **flags, save=save, **{"exit-interval": 3}), tmp_path / "a.jsonl")
    assert sorted(first) == [1, 2, 3]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    rest = train(4, model_flags(prefix, tok, **flags, load=save), tmp_path / "b.jsonl")
    assert sorted(rest) == [4, 5, 6]
    assert_same_losses({**first, **rest}, full, "resume")


def test_checkpoint_of_another_layout_loads(reference, tiny_corpus, tmp_path):
    """Saved at tp2, resumed at dp2 ZeRO-1: the loss curve goes on as in one process (tests/distributed/
    test_checkpoint.py covers more layouts)."""
    prefix, tok = tiny_corpus
    save = tmp_path / "ckpt"
    first = train(2, model_flags(prefix, tok, tp=2, save=save, **{"exit-interval": 2}), tmp_path / "a.jsonl")
    rest = train(2, model_flags(prefix, tok, load=save, **{"use-distributed-optimizer": True}), tmp_path / "b.jsonl")
    assert sorted(rest) == [3, 4, 5]
    assert_same_losses({**first, **rest}, reference, "tp2 -> dp2 zero1")


def zero_json(tmp_path, stage, offload=False):
    """A DeepSpeed config with "auto" batch and optimizer values, as Hugging Face users write them."""
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                             "warmup_num_steps": 2, "total_num_steps": "auto",
                                                             "warmup_type": "linear"}},
           "zero_optimization": {"stage": stage, "overlap_comm": True, "reduce_bucket_size": 5000,
                                 "stage3_param_persistence_threshold": 64, "stage3_prefetch_bucket_size": 4000}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / f"zero{stage}{'-offload' if offload else ''}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# The plainest DeepSpeed file plus flags trains the curve of the flags alone (issue 10.1): keys it leaves out take
# the flags' values (here the optimizer, clipping, batch and precision of `reference`).
PLAIN_JSON_LAYOUTS = {
    "zero0-dp2": (2, {"zero_optimization": {"stage": 0}}, {}),
    "zero1-tp2-dp2": (4, {"zero_optimization": {"stage": 1}}, {"tp": 2}),
    "zero2-pp2-dp2": (4, {"zero_optimization": {"stage": 2}}, {"pp": 2}),
    "zero3-dp2": (2, {"zero_optimization": {"stage": 3}}, {}),
    "issue-repro-auto": (1, {"zero_optimization": {"stage": 1}, "train_batch_size": "auto",
                             "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}, {}),
}


@pytest.mark.parametrize("layout", list(PLAIN_JSON_LAYOUTS))
def test_a_plain_deepspeed_json_trains_the_flags_curve(layout, reference, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, content, over = PLAIN_JSON_LAYOUTS[layout]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    losses = train(world, model_flags(prefix, tok, **over, **{"zero-config": path}), tmp_path / "m.jsonl")
    assert_same_losses(losses, reference, layout)


ZERO_LAYOUTS = {
    "dp2-zero1": (2, 1, {}),
    "dp2-zero2": (2, 2, {}),
    "dp4-zero3": (4, 3, {}),
    "tp2-dp2-zero3": (4, 3, {"tp": 2}),
    "tp2-dp2-zero2-sp": (4, 2, {"tp": 2, "sequence-parallel": True}),
    "pp2-dp2-zero2": (4, 2, {"pp": 2}),
    "dp2-zero2-offload": (2, "2-offload", {}),
}


@pytest.fixture(scope="module")
def zero_reference(tiny_corpus, tmp_path_factory):
    prefix, tok = tiny_corpus
    tmp = tmp_path_factory.mktemp("zref")
    return train(1, model_flags(prefix, tok, **{"zero-config": zero_json(tmp, 0)}), tmp / "m.jsonl")


@pytest.mark.parametrize("layout", list(ZERO_LAYOUTS))
def test_zero_stages_match_single_process(layout, zero_reference, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, stage, over = ZERO_LAYOUTS[layout]
    offload = stage == "2-offload"
    path = zero_json(tmp_path, 2 if offload else stage, offload)
    losses = train(world, model_flags(prefix, tok, **over, **{"zero-config": path}), tmp_path / "m.jsonl")
    assert_same_losses(losses, zero_reference, layout)


def _main_with_nan_grads(rank, world, argv, bad_rank, from_iteration):
    """Train, with rank `bad_rank`'s gradients turned to NaN from `from_iteration` on."""
    from megaengine.training import trainer
    build = trainer.build_optimizer

    def poisoned(chunks, args, state):
        opt = build(chunks, args, state)
        step = opt.step

        def step_with_nan(lr=None):
            opt.finish_grad_sync()
            if rank == bad_rank and opt.step_count + 1 >= from_iteration:
                opt.reducer.grad_piece(opt.buckets[0])[0] = float("nan")
            return step(lr)
        opt.step = step_with_nan
        return opt
    trainer.build_optimizer = poisoned
    return trainer.main(argv)


def test_nan_gradients_skip_everywhere_then_stop(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    save = tmp_path / "ckpt"
    argv = model_flags(prefix, tok, tp=2, save=save, **{"save-interval": 1, "max-skipped-steps": 3, "train-iters": 8,
                                                        "metrics-file": tmp_path / "m.jsonl"})
    codes = run_distributed(_main_with_nan_grads, 4, argv, 3, 3, timeout=300)
    assert codes == [3] * 4  # every rank stops together
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl") if '"loss"' in line]
    assert [r["skipped"] for r in records] == [0, 0, 1, 2, 3]  # cumulative skipped steps, logged every iteration
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"  # the last good state


def _main_with_sigterm(rank, world, argv, at_iteration):
    """Rank 0 alone receives SIGTERM during iteration `at_iteration` (as a preempted SLURM task would)."""
    import signal
    from megaengine.training import trainer
    step, calls = trainer.train_step, []

    def train_step(*a, **k):
        calls.append(1)
        if rank == 0 and len(calls) == at_iteration:
            signal.raise_signal(signal.SIGTERM)
        return step(*a, **k)
    trainer.train_step = train_step
    return trainer.main(argv)


def test_sigterm_saves_and_exits_cleanly_on_every_rank(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    save = tmp_path / "ckpt"
    argv = model_flags(prefix, tok, tp=2, save=save, **{"exit-signal-handler": True, "train-iters": 8,
                                                        "metrics-file": tmp_path / "m.jsonl"})
    assert run_distributed(_main_with_sigterm, 4, argv, 3, timeout=300) == [0] * 4
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def _export_hf_model(rank, world, out_dir, tokenizer):
    from megaengine import parallel
    from megaengine.data import Tokenizer
    from megaengine.models import GPT, GPTConfig
    from megaengine.tools.hf import export
    parallel.initialize()
    config = GPTConfig(num_layers=8, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=Tokenizer(tokenizer).vocab_size, init_seed=99)  # not the training seed
    export(GPT(config), config, out_dir)


def test_load_hf_starts_every_layout_from_the_same_weights(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    run_distributed(_export_hf_model, 1, str(tmp_path / "hf"), tok)
    flags = {"load-hf": tmp_path / "hf", "train-iters": 2}
    single = train(1, model_flags(prefix, tok, **flags), tmp_path / "a.jsonl")
    sharded = train(4, model_flags(prefix, tok, tp=2, pp=2, **flags), tmp_path / "b.jsonl")
    fresh = train(1, model_flags(prefix, tok, **{"train-iters": 2}), tmp_path / "c.jsonl")
    assert_same_losses(sharded, single, "load-hf tp2 pp2")
    assert abs(single[1]["loss"] - fresh[1]["loss"]) > 1e-3  # the HF weights were used


def test_data_from_a_larger_vocabulary_is_refused_before_training(tiny_corpus, tmp_path):
    import numpy as np
    from megaengine.data import IndexedDatasetBuilder
    from megaengine.data.indexed import bin_path, idx_path
    prefix, tok = tiny_corpus
    other = str(tmp_path / "big_text_document")
    builder = IndexedDatasetBuilder(bin_path(other), dtype=np.uint16)
    for doc in range(40):
        builder.add_item((np.arange(200) * 15 + doc) % 3000)  # ids up to 2999; the tokenizer has 512
        builder.end_document()
    builder.finalize(idx_path(other))
    argv = model_flags(other, tok, tp=2)
    assert run_distributed(_main, 2, argv, timeout=120) == [2, 2]

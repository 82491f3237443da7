"""Context parallelism through the trainer's flags (--cp, --cp-comm-type) on gloo ranks.

Five steps at each layout (ZeRO 0, 1 and 3 among them) equal one process (relative loss difference <= 1e-5
per iteration, fp32), for a GPT-2 style model (learned positions, MHA) and a LLaMA style one (RoPE, GQA 4/2,
RMSNorm, SwiGLU); one reference run per model; the validation loss after the last step is compared too. The weights start at std 0.2 (not 0.02) so that attention is
sharp enough for misplaced positions to move the loss by > 1e-3 (checked by hand at cp2 and cp4: positions
0..s/cp-1 on every rank, or attention over the local tokens only, fail by 3e-3 to 3e-2). The same runs count the bytes context-parallel attention sends in each step and
compare them per layer with context_parallel.cost. A checkpoint saved at cp2 resumes at cp1 and at cp4 on the
reference loss curve. Bad layouts stop with one message from rank 0.
"""
import json

import pytest

from megaengine.context_parallel import attention_send_bytes
from megaengine.testing import run_distributed
from test_checkpoint import zero3_json
from test_training import TOL, _main, assert_same_losses, model_flags, train

EVAL = {"eval-iters": 1, "eval-interval": 5}  # one validation pass, at the end: its loss is compared too
MODELS = {
    "learned": {"num-layers": 2, "init-method-std": 0.2},
    "rope": {"num-layers": 2, "init-method-std": 0.2, "position-embedding-type": "rope", "normalization": "RMSNorm",
             "swiglu": True, "num-query-groups": 2, "disable-bias-linear": True},
}
HEADS, HEAD_DIM, SEQ, MICRO, GLOBAL = 4, 8, 16, 2, 8  # model_flags' sizes: hidden 32 / 4 heads

# name: (world, flags)
LAYOUTS = {
    "cp2": (2, {"cp": 2}),
    "cp4": (4, {"cp": 4}),
    "cp2-tp2": (4, {"cp": 2, "tp": 2}),
    "cp2-tp2-sp": (4, {"cp": 2, "tp": 2, "sequence-parallel": True}),
    "cp2-pp2": (4, {"cp": 2, "pp": 2}),
    "cp2-dp2-zero1": (4, {"cp": 2, "use-distributed-optimizer": True}),
    "cp2-a2a": (2, {"cp": 2, "cp-comm-type": "a2a"}),
    "cp2-dp2-zero3": (4, {"cp": 2, "zero-config": "zero3"}),
}


def _main_counting(rank, world, argv):
    """Train; return the exit code and, per step, the bytes and calls this rank's context-parallel attention
    sent (ring: "send"; all-to-all: "all_to_all"), counted by megaengine.parallel.comm around train_step."""
    from megaengine.parallel.comm import comm_stats
    from megaengine.training import trainer
    step, steps = trainer.train_step, []

    def counted(*a, **k):
        comm_stats.reset()
        loss = step(*a, **k)
        steps.append({op: (comm_stats.volume[op], comm_stats.calls[op]) for op in ("send", "all_to_all")})
        return loss
    trainer.train_step = counted
    return trainer.main(argv), steps


def expected_per_layer(flags: dict, groups: int) -> tuple[str, float, int]:
    """(counted op, bytes, calls) one rank's attention sends per layer per micro-batch, forward and backward."""
    cp, tp, comm = flags["cp"], flags.get("tp", 1), flags.get("cp-comm-type", "p2p")
    sent = attention_send_bytes(comm, cp=cp, batch=MICRO, seq=SEQ, heads=HEADS // tp, kv_heads=groups // tp,
                                head_dim=HEAD_DIM, dtype_bytes=4)
    if comm == "p2p":
        return "send", sent["forward"] + sent["backward"], 3 * (cp - 1)
    return "all_to_all", sent["forward"] + sent["backward"], 8  # q, k, v, out; and their gradients


def valid_loss(metrics) -> float:
    (loss,) = [r["valid_loss"] for r in map(json.loads, open(metrics)) if "valid_loss" in r]
    return loss


@pytest.fixture(scope="module")
def references(tiny_corpus, tmp_path_factory):
    prefix, tok = tiny_corpus
    tmp = tmp_path_factory.mktemp("cpref")
    out = {name: train(1, model_flags(prefix, tok, **over, **EVAL), tmp / f"{name}.jsonl")
           for name, over in MODELS.items()}
    return {name: (losses, valid_loss(tmp / f"{name}.jsonl")) for name, losses in out.items()}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_five_steps_match_single_process_and_send_the_theory(layout, model, references, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, over = LAYOUTS[layout]
    metrics = tmp_path / "m.jsonl"
    flags = {**over, "zero-config": zero3_json(tmp_path)} if "zero-config" in over else over
    out = run_distributed(_main_counting, world, model_flags(prefix, tok, **MODELS[model], **flags, **EVAL) +
                          ["--metrics-file", str(metrics)], timeout=300)
    assert [code for code, _ in out] == [0] * world
    losses = {r["iteration"]: r for r in map(json.loads, open(metrics)) if "loss" in r}
    reference, reference_valid = references[model]
    assert_same_losses(losses, reference, f"{layout} {model}")
    assert abs(valid_loss(metrics) - reference_valid) <= TOL * reference_valid

    op, per_layer, calls = expected_per_layer(over, MODELS[model].get("num-query-groups", HEADS))
    layers = MODELS[model]["num-layers"] // over.get("pp", 1)
    micro_batches = GLOBAL // (MICRO * (world // (over["cp"] * over.get("tp", 1) * over.get("pp", 1))))
    for rank, (_, steps) in enumerate(out):
        assert len(steps) == 5
        for step in steps:
            volume, n = step[op]
            assert volume / (layers * micro_batches) == per_layer, (layout, rank, step)
            assert n == layers * micro_batches * calls, (layout, rank, step)


def test_checkpoint_saved_at_cp2_resumes_at_cp1_and_cp4(references, tiny_corpus, tmp_path):
    """Saved at cp2 x dp2 with ZeRO-1 (optimizer state sharded over the four dp x cp replicas), resumed in one
    process and at cp4 ZeRO-1: iterations 3-5 continue the reference curve."""
    prefix, tok = tiny_corpus
    flags, save = MODELS["learned"], tmp_path / "ckpt"
    first = train(4, model_flags(prefix, tok, **flags, cp=2, save=save, **{"use-distributed-optimizer": True,
                                                                            "exit-interval": 2}), tmp_path / "a.jsonl")
    assert sorted(first) == [1, 2]
    meta = json.loads((save / "iter_0000002" / "meta.json").read_text())
    assert meta["layout"]["cp"] == 2 and meta["layout"]["dp"] == 2
    for world, over in ((1, {}), (4, {"cp": 4, "use-distributed-optimizer": True})):
        rest = train(world, model_flags(prefix, tok, **flags, **over, load=save), tmp_path / f"b{world}.jsonl")
        assert sorted(rest) == [3, 4, 5]
        assert_same_losses({**first, **rest}, references["learned"][0], f"cp2 -> {over or 'cp1'}")


BAD = {
    "seq not divisible by 2 cp": (2, {"cp": 2, "seq-length": 18}, "--seq-length=18 must be divisible by 2 x "
                                  "--context-parallel-size = 4"),
    "heads for a2a": (4, {"cp": 4, "cp-comm-type": "a2a", "num-query-groups": 2},
                      "--num-query-groups=2 must be divisible by --context-parallel-size x tensor-parallel size"),
    "world": (4, {"cp": 3}, "world size 4 is not divisible by tp x pp x cp = 1 x 1 x 3 = 3"),
    "attention dropout": (2, {"cp": 2, "attention-dropout": 0.1}, "--attention-dropout=0.1: context-parallel"),
    "sdpa": (2, {"cp": 2, "attention-backend": "sdpa"}, "--attention-backend sdpa cannot run context-parallel"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layout_is_one_message_from_rank_0_before_any_work(case, tiny_corpus, capfd):
    prefix, tok = tiny_corpus
    world, over, message = BAD[case]
    argv = model_flags(prefix, tok, **{**MODELS["learned"], **over})
    assert run_distributed(_main, world, argv, timeout=120) == [2] * world
    out = capfd.readouterr()
    assert out.err.count("megaengine: error:") == 1 and message in out.err, out.err
    assert "megaengine configuration" not in out.out  # stopped while resolving the flags: no group, no model


def test_cp_config_defaults_and_summary():
    from megaengine.config import resolve
    from megaengine.errors import ConfigError
    base = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
            "--global-batch-size 8 --train-iters 1 --lr 1e-3").split()
    cfg = resolve(base + ["--cp", "2", "--tp", "2", "--cp-comm-type", "a2a"], 8)
    assert (cfg.parallel.cp, cfg.parallel.cp_comm_type, cfg.parallel.dp) == (2, "a2a", 2)
    assert cfg.model.attention_dropout == 0.0  # the default 0.1 is off: cp attention has no dropout
    assert "x cp 2 [flag] x dp 2" in cfg.summary() and "context parallel a2a [flag], 8 tokens per rank" in cfg.summary()
    with pytest.raises(ConfigError, match=r"--seq-length=12 must be divisible by 2 x --context-parallel-size \(2\) "
                       r"and --context-parallel-size x tensor-parallel size \(2 x 4\) with --sequence-parallel; use "
                       r"a multiple of 8"):
        resolve(base + ["--cp", "2", "--tp", "4", "--sequence-parallel", "--seq-length", "12"], 8)
    plain = resolve(base, 8)
    assert (plain.parallel.cp, plain.parallel.dp, plain.model.attention_dropout) == (1, 8, 0.1)
    assert "cp" not in plain.summary().splitlines()[1]


@pytest.mark.parametrize("comm,recompute", [("p2p", {"recompute-granularity": "full", "recompute-method": "uniform",
                                                      "recompute-num-layers": 1}),
                                             ("a2a", {"recompute-activations": True})])
def test_recomputation_leaves_the_cp_curve_as_it_is(comm, recompute, tiny_corpus, tmp_path):
    """Recomputing the ring (or the all-to-all) attention in backward, with hidden dropout on (its masks replayed
    per cp rank): the curve equals the one without recomputation to 1e-6."""
    prefix, tok = tiny_corpus
    over = {**MODELS["rope"], "cp": 2, "cp-comm-type": comm, "hidden-dropout": 0.1, "train-iters": 3}
    plain = train(2, model_flags(prefix, tok, **over), tmp_path / "plain.jsonl")
    again = train(2, model_flags(prefix, tok, **over, **recompute), tmp_path / "recompute.jsonl")
    assert_same_losses(again, plain, f"cp2 {comm} with recomputation", tol=1e-6)

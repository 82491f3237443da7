"""FP8 through pretrain_gpt.py's flags (and the engine) on gloo ranks: every layout trains the same curve with
the same scales, a checkpoint with delayed scaling resumes on the uninterrupted curve at another layout, and
200 iterations on the embedded corpus end within 2% of bf16.

Layouts and checkpoints run with fp32 parameters around the FP8 matmuls (the --bf16 requirement lifted for the
test): bf16's own layout noise (tp2 against tp1 without FP8: 4e-5 in the loss of this model) flips FP8
roundings and grows to ~1.5e-4 with FP8, which would hide what is tested here, that the scales are the same
at every layout. Even in fp32 another layout's summation order flips an FP8 rounding now and then, and in this
tiny model one flipped element is visible. Bounds, relative, against one process: loss <= 1e-4 and grad norm
<= 1e-3 at every iteration; the delayed-scaling state after the run (amax histories and scales, read from the
final checkpoint), per slot: input 5e-2, weight 1e-3, output gradient 1e-1.
Measured, worst layout: loss 6.7e-6, grad norm 2.3e-4 (tensorwise tp2; delayed tp2 1.7e-5; cp2 <= 5.2e-5; dp
and pp layouts <= 6.1e-7); state 7.5e-3 / 9.8e-5 / 2.3e-2 (tp2, cp2; dp and pp layouts <= 4.4e-7).
Broken on purpose, each fails: scales of tp shards not MAX-reduced in the layers (grad norm 1.9e-3 to 4.5e-3);
amaxes over tokens not MAX-reduced over cp (2.5e-3 to 6.4e-3); histories not reduced over tp (state: weight
0.19) or over dp (gradient 0.62, weight 2.8e-2); gradient amaxes kept in each layout's own units (gradient slot
2x); histories not restored on resume (0.81).
"""
import json

import pytest
import torch

from megaengine.checkpoint import consolidated_state_dict
from megaengine.testing import run_distributed
from test_training import _main, model_flags, train

TOLS = {"loss": 1e-4, "grad_norm": 1e-3}
STATE_TOLS = (5e-2, 1e-3, 1e-1)  # input, weight, output gradient
FP8 = {"fp8-format": "hybrid"}


def _main_fp32(rank, world, argv):
    """main() with FP8 allowed around fp32 parameters (runs refuse that without --bf16)."""
    import megaengine.config
    megaengine.config.check_fp8_run = lambda *a, **k: None
    return _main(rank, world, argv)


def train_fp32(world, argv, metrics):
    return train(world, argv, metrics, main=_main_fp32)


def assert_same_curves(a, b, label):
    assert a.keys() == b.keys(), (label, a.keys(), b.keys())
    for it in a:
        for key, tol in TOLS.items():
            rel = abs(a[it][key] - b[it][key]) / abs(b[it][key])
            assert rel <= tol, f"{label}: iteration {it} {key} {a[it][key]} vs {b[it][key]} (rel {rel:.1e})"


def fp8_state(root) -> dict:
    """{global name: tensor} of the amax histories and scales in the newest checkpoint under `root`."""
    return consolidated_state_dict(str(root), "buffer")[1]


def assert_same_fp8_state(a: dict, b: dict, label):
    assert a.keys() == b.keys(), (label, sorted(a), sorted(b))
    for name in a:
        for slot, tol in enumerate(STATE_TOLS):  # the last dim of a history (len, 3) and of the scales (3,)
            x, y = a[name][..., slot], b[name][..., slot]
            rel = ((x - y).abs().max() / y.abs().max()).item()
            assert rel <= tol, f"{label}: {name}[..., {slot}] {x.tolist()} vs {y.tolist()} (rel {rel:.1e})"


LAYOUTS = {
    "tp2": (2, {"tp": 2}),
    "tp2-sp": (2, {"tp": 2, "sequence-parallel": True}),
    "pp2": (2, {"pp": 2}),
    "dp2-zero1": (2, {"use-distributed-optimizer": True}),
    "pp2-zb-h1": (2, {"pp": 2, "pipeline-schedule": "zb-h1"}),
    "dp2-zero3": (2, {"zero-config": 3}),
    "cp2": (2, {"cp": 2}),
}
# Current scaling has no state to reduce over dp or pp: the layouts that split its operands (tp: weights and
# activations; cp: tokens) are the ones that matter.
CASES = [("delayed", layout) for layout in LAYOUTS] + [(r, layout) for r in ("tensorwise", "rowwise")
                                                       for layout in ("tp2", "cp2")]


@pytest.fixture(scope="module")
def references(tiny_corpus, tmp_path_factory):
    prefix, tok = tiny_corpus
    tmp, runs = tmp_path_factory.mktemp("fp8ref"), {}

    def reference(recipe):
        if recipe not in runs:
            flags = model_flags(prefix, tok, **FP8, **{"fp8-recipe": recipe}, save=tmp / recipe)
            runs[recipe] = train_fp32(1, flags, tmp / f"{recipe}.jsonl"), fp8_state(tmp / recipe)
        return runs[recipe]
    return reference


@pytest.mark.parametrize("recipe,layout", CASES)
def test_five_fp8_steps_match_single_process(recipe, layout, references, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, over = LAYOUTS[layout]
    if "zero-config" in over:  # the stage alone; everything else from the flags, as in the reference
        (tmp_path / "zero.json").write_text(json.dumps({"zero_optimization": {"stage": over["zero-config"]}}))
        over = {"zero-config": tmp_path / "zero.json"}
    flags = model_flags(prefix, tok, **FP8, **over, **{"fp8-recipe": recipe}, save=tmp_path / "ckpt")
    losses = train_fp32(world, flags, tmp_path / "m.jsonl")
    curves, state = references(recipe)
    assert_same_curves(losses, curves, f"{recipe} {layout}")
    assert_same_fp8_state(fp8_state(tmp_path / "ckpt"), state, f"{recipe} {layout}")
    assert bool(state) == (recipe == "delayed")
    assert losses[5]["loss"] < losses[1]["loss"], "loss should fall over 5 steps"


def _state_after_load_model(rank, world, root):
    from megaengine import checkpoint
    model = checkpoint.load_model(root)
    return {n: b.clone() for n, b in model.state_dict().items() if ".fp8." in n}


def test_delayed_scaling_resumes_on_the_uninterrupted_curve_at_another_layout(tiny_corpus, tmp_path):
    """Saved at pp2 after 3 steps (stage 1 holds layers 4-7 as its local layers 0-3), resumed at dp2 with ZeRO-1
    (other gradient units: each rank's loss is the mean of half the batch): the amax histories come back by
    global name, and the curve and the FP8 state go on as in one uninterrupted process. Without them the
    resumed run restarts its histories, and the state check fails (a zero row against a full one); with
    gradient amaxes kept in each layout's own units, the gradient slot is off by 2x."""
    prefix, tok = tiny_corpus
    flags = {**FP8, "fp8-amax-history-len": 4, "fp8-amax-compute-algo": "max", "train-iters": 6}
    full = train_fp32(1, model_flags(prefix, tok, **flags, save=tmp_path / "full"), tmp_path / "full.jsonl")
    save = tmp_path / "ckpt"
    first = train_fp32(2, model_flags(prefix, tok, **flags, pp=2, save=save, **{"exit-interval": 3}),
                       tmp_path / "a.jsonl")
    rest = train_fp32(2, model_flags(prefix, tok, **flags, load=save, save=save, **{"use-distributed-optimizer": True}),
                      tmp_path / "b.jsonl")
    assert sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5, 6]
    assert_same_curves({**first, **rest}, full, "pp2 -> dp2 zero1")
    assert_same_fp8_state(fp8_state(save), fp8_state(tmp_path / "full"), "pp2 -> dp2 zero1")

    index = json.loads((save / "iter_0000003" / "meta.json").read_text())["tensors"]
    fp8_keys = [k for k in index if k.startswith("buffer/")]
    assert len(fp8_keys) == 8 * 4 * 2  # 8 layers x (qkv, proj, fc1, fc2) x (amax_history, scale)
    assert index["buffer/layers.7.mlp.fc2.fp8.amax_history"]["shape"] == [4, 3]
    history = consolidated_state_dict(str(save), "buffer", tag=3)[1]["layers.7.mlp.fc2.fp8.amax_history"]
    assert (history[:3] > 0).all() and (history[3] == 0).all()  # three steps recorded, newest first
    loaded = run_distributed(_state_after_load_model, 1, str(save))[0]  # megaengine.load_model: the newest
    saved = fp8_state(save)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def _engine_steps(rank, world, tmp):
    """A custom model of FP8Linear layers trained through megaengine.initialize: the engine advances the
    histories at each optimizer step and its checkpoints carry them."""
    import torch.distributed as dist
    import megaengine
    from megaengine.fp8 import FP8Config, FP8Linear
    torch.manual_seed(0)
    config = FP8Config(recipe="delayed", amax_history_len=3)

    def build():
        return torch.nn.Sequential(FP8Linear(16, 32, fp8=config, group=dist.group.WORLD),
                                   torch.nn.GELU(), FP8Linear(32, 16, fp8=config, group=dist.group.WORLD))
    engine = megaengine.initialize(build(), {"train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": {
        "enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    histories = []
    for step in range(4):
        loss = engine(torch.randn(8, 16, dtype=torch.bfloat16)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        histories.append(engine.module[0].fp8.amax_history.clone())
    engine.save_checkpoint(tmp)
    other = megaengine.initialize(build(), engine.config)
    other.load_checkpoint(tmp)
    return histories, other.module[0].fp8.state_dict(), engine.module[0].fp8.state_dict()


def test_engine_updates_and_checkpoints_fp8_state(tmp_path):
    histories, loaded, saved = run_distributed(_engine_steps, 1, str(tmp_path))[0]
    assert (histories[0] == 0).all()  # micro-batch 1 of 2: no optimizer step yet
    assert (histories[1][0] > 0).all() and (histories[1][1:] == 0).all()  # one step, newest row first
    assert torch.equal(histories[3][1], histories[1][0])  # the next step shifted it down
    assert loaded.keys() == saved.keys() == {"amax_history", "scale"}
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def embedded_corpus(tmp_path_factory):
    from megaengine.data import ensure_default_corpus
    cache = tmp_path_factory.mktemp("megaengine-cache")
    ensure_default_corpus(str(cache))
    return cache


def test_fp8_ends_within_2_percent_of_bf16_on_the_embedded_corpus(embedded_corpus, tmp_path):
    """200 iterations of a 2-layer GPT on the embedded corpus, --bf16 against --bf16 --fp8-format hybrid
    (delayed scaling), same seed and data: the mean training loss of the last 20 iterations (one log window)
    within 2%. Measured here: 6.080 (bf16) against 6.102 (FP8), +0.4%; tensorwise +0.2%, rowwise +0.3%."""
    flags = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 64,
             "micro-batch-size": 8, "global-batch-size": 8, "train-iters": 200, "lr": 3e-3, "min-lr": 3e-4,
             "lr-warmup-iters": 20, "weight-decay": 0.1, "adam-beta2": 0.95, "hidden-dropout": 0.0,
             "attention-dropout": 0.0, "log-interval": 20, "eval-interval": 1000, "eval-iters": 0,
             "sample-tokens": 0, "seed": 1234, "data-cache-dir": embedded_corpus, "bf16": True}

    def run(**over):
        argv = []
        for k, v in {**flags, **over}.items():
            argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        return train(1, argv, tmp_path / f"{len(over)}.jsonl")
    bf16, fp8 = run(), run(**FP8)
    assert bf16[200]["loss"] < bf16[20]["loss"] - 1.0, "the model should learn"
    gap = (fp8[200]["loss"] - bf16[200]["loss"]) / bf16[200]["loss"]
    assert abs(gap) <= 0.02, f"FP8 {fp8[200]['loss']:.4f} vs bf16 {bf16[200]['loss']:.4f}: {gap:+.2%}"

"""Checkpoints reshard: saved at tp2 pp2 (two virtual stages each) dp2 ZeRO-1, in the background, and resumed at
tp4, at dp4 ZeRO-3 and in one process, the loss curve continues that of an uninterrupted run (<= 1e-5 relative,
dropout 0). Same layout resumes exactly (dropout on). Damaged, half-written or mismatched checkpoints are refused
with a ConfigError before any step, or skipped when the pointer never reached them.
"""
import json
import os
import re
import shutil

import pytest
import torch

from megaengine.testing import rel_error, run_distributed
from megaengine import checkpoint
from test_training import _main, assert_same_losses, model_flags, train

# GQA and SwiGLU: fused parameters with unequal and equal parts. Vocabulary 512 padded to a multiple of 96 x tp:
# 576 rows at tp 1 and 2, 768 at tp 4, where the last tp rank holds padding only.
ITERS = {"train-iters": 6, "num-attention-heads": 8, "num-query-groups": 4, "swiglu": True,
         "make-vocab-size-divisible-by": 96}
SAVED_AT = {"tp": 2, "pp": 2, "num-layers-per-virtual-pipeline-stage": 2, "use-distributed-optimizer": True}


def zero3_json(tmp_path):
    """ZeRO-3 with the optimizer and LR schedule of the flags (no DeepSpeed scheduler)."""
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": 5000, "stage3_param_persistence_threshold": 64}}
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """Six uninterrupted steps in one process, saving at 3 and 6."""
    prefix, tok = tiny_corpus
    tmp = tmp_path_factory.mktemp("reference")
    save = tmp / "ckpt"
    losses = train(1, model_flags(prefix, tok, **ITERS, save=save, **{"save-interval": 3}), tmp / "m.jsonl")
    return losses, save


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    """Three steps at tp2 pp2 v2 dp2 ZeRO-1, saving every step in the background, keeping the newest two."""
    prefix, tok = tiny_corpus
    tmp = tmp_path_factory.mktemp("saved")
    save = tmp / "ckpt"
    argv = model_flags(prefix, tok, **ITERS, **SAVED_AT, save=save,
                       **{"save-interval": 1, "exit-interval": 3, "async-save": True, "save-retain": 2})
    codes = run_distributed(_main, 8, argv + ["--metrics-file", str(tmp / "m.jsonl")], timeout=300)
    assert codes == [0] * 8, codes
    losses = {r["iteration"]: r for r in map(json.loads, open(tmp / "m.jsonl")) if "loss" in r}
    return losses, save


def test_background_saves_are_complete_and_pruned(saved, reference):
    losses, save = saved
    assert sorted(losses) == [1, 2, 3]
    assert_same_losses(losses, {i: reference[0][i] for i in (1, 2, 3)}, "saved run")
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000003", checkpoint.POINTER]
    assert (save / checkpoint.POINTER).read_text().strip() == "3"


def assert_same_tensors(root, reference_root, iteration):
    """Pieces saved by many ranks assemble into the tensors one process saved at the same iteration.

    Each kind is compared as one vector over all its tensors: weights and first moments to 1e-5 relative,
    second moments to 2e-5 (squaring doubles a gradient's relative error). Each tensor alone must agree to 1e-3,
    which still catches any misplaced or stale piece (those are O(1) off) while leaving room for the bias
    gradients: sums of many near-cancelling terms whose rounding follows the layout's reduction order, so
    their relative error reaches 1e-5 (moments) and, once Adam normalises them, 7e-5 (bias weights), varying
    with the CPU model."""
    for kind in checkpoint.KINDS:
        _, ours = checkpoint.consolidated_state_dict(str(root), kind)
        _, theirs = checkpoint.consolidated_state_dict(str(reference_root), kind, tag=iteration)
        assert ours.keys() == theirs.keys()
        assert "word_embeddings.weight" in ours and "layers.7.mlp.fc1.weight" in ours
        assert ours["word_embeddings.weight"].shape[0] == 512  # unpadded
        for name in ours:
            assert ours[name].shape == theirs[name].shape, name
            assert rel_error(ours[name], theirs[name]) <= 1e-3, (kind, name)
        whole = [torch.cat([d[name].flatten() for name in sorted(ours)]) for d in (ours, theirs)]
        assert rel_error(*whole) <= (2e-5 if kind == "exp_avg_sq" else 1e-5), kind


def test_saved_tensors_are_those_of_the_single_process_run(saved, reference):
    assert_same_tensors(saved[1], reference[1], 3)


RESUME_AT = {
    "tp4": (4, {"tp": 4}),
    "dp4-zero3": (4, "zero3"),
}


@pytest.mark.parametrize("layout", list(RESUME_AT))
def test_resume_at_another_layout_continues_the_loss_curve(layout, saved, reference, tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    world, over = RESUME_AT[layout]
    if over == "zero3":
        over = {"zero-config": zero3_json(tmp_path)}
    save = tmp_path / "ckpt"  # and saves at this layout when done
    rest = train(world, model_flags(prefix, tok, **ITERS, **over, load=saved[1], save=save), tmp_path / "m.jsonl")
    assert sorted(rest) == [4, 5, 6]
    assert_same_losses(rest, {i: reference[0][i] for i in (4, 5, 6)}, layout)
    assert_same_tensors(save, reference[1], 6)


def test_single_process_resume_skips_half_written_saves(saved, reference, tiny_corpus, tmp_path):
    """A save killed before its rename leaves iter_N.tmp; one killed before the pointer moved leaves a complete
    iter_N the pointer does not name. Neither is loaded: the run goes on from iteration 3."""
    prefix, tok = tiny_corpus
    root = tmp_path / "ckpt"
    shutil.copytree(saved[1], root)
    os.makedirs(root / "iter_0000004.tmp")
    (root / "iter_0000004.tmp" / "shard_00000.pt").write_bytes(b"half a file")
    shutil.copytree(root / "iter_0000002", root / "iter_0000005")
    rest = train(1, model_flags(prefix, tok, **ITERS, load=root), tmp_path / "m.jsonl")
    assert sorted(rest) == [4, 5, 6]
    assert_same_losses(rest, {i: reference[0][i] for i in (4, 5, 6)}, "single process")


def test_snapshot_taken_before_training_went_on(saved, reference, tiny_corpus, tmp_path):
    """Iteration 2 was written while step 3 ran: it must hold iteration 2's state, not a later one."""
    prefix, tok = tiny_corpus
    root = tmp_path / "ckpt"
    shutil.copytree(saved[1], root)
    (root / checkpoint.POINTER).write_text("2\n")
    rest = train(2, model_flags(prefix, tok, **ITERS, pp=2, load=root), tmp_path / "m.jsonl")
    assert sorted(rest) == [3, 4, 5, 6]
    assert_same_losses(rest, {i: reference[0][i] for i in (3, 4, 5, 6)}, "from iteration 2")


def test_same_layout_resume_is_exact(tiny_corpus, tmp_path):
    prefix, tok = tiny_corpus
    flags = dict(**ITERS, pp=2, **{"use-distributed-optimizer": True, "hidden-dropout": 0.1})  # RNG must resume
    full = train(4, model_flags(prefix, tok, **flags), tmp_path / "full.jsonl")
    save = tmp_path / "ckpt"
    first = train(4, model_flags(prefix, tok, **flags, save=save, **{"exit-interval": 3}), tmp_path / "a.jsonl")
    rest = train(4, model_flags(prefix, tok, **flags, load=save), tmp_path / "b.jsonl")
    assert sorted(rest) == [4, 5, 6]
    assert_same_losses({**first, **rest}, full, "same layout")


def test_inspect_lists_layout_and_global_tensors(saved, capsys):
    from megaengine.tools.checkpoint import main
    assert main(["inspect", str(saved[1]), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "iteration 3 | consumed samples 24" in out
    assert "saved at tp 2 pp 2 dp 2 virtual stages 2 ZeRO stage 1" in out
    assert "hidden_size=32" in out
    assert re.search(r"layers.0.attention.qkv.weight#1 +\[16, 32\] +2 .* model float32, master float32", out)
    assert re.search(r"word_embeddings.weight +\[512, 32\] ", out)
    assert "all intact" in out
    assert main(["inspect", str(saved[1] / "iter_0000002")]) == 0
    assert "iteration 2 |" in capsys.readouterr().out


# ---- refused ----

def _damage_a_tensor(path):
    """Flip one byte inside the data of the largest tensor of a shard file."""
    tensors = torch.load(path, weights_only=True)
    name = max(tensors, key=lambda n: tensors[n].numel())
    data = tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
    raw = bytearray(open(path, "rb").read())
    at = raw.find(data) + len(data) // 2
    raw[at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def _truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "corrupt": (_damage_a_tensor, "fails its checksum"),
    "no meta": (lambda path: os.remove(os.path.join(os.path.dirname(path), "meta.json")), "meta.json: missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_on_every_rank(damage, saved, tiny_corpus, tmp_path, capfd):
    prefix, tok = tiny_corpus
    root = tmp_path / "ckpt"
    shutil.copytree(saved[1], root)
    fn, message = DAMAGE[damage]
    fn(str(root / "iter_0000003" / "shard_00002.pt"))
    codes = run_distributed(_main, 2, model_flags(prefix, tok, **ITERS, tp=2, load=root), timeout=120)
    assert codes == [2, 2]
    err = capfd.readouterr().err
    assert message in err, err
    if damage != "no meta":
        assert "shard_00002.pt" in err, err


MISMATCH = {
    "other shape": ({"hidden-size": 48}, "another model shape (hidden_size: saved 32, now 48"),
    "other dtype": ({"bf16": True}, "was saved as torch.float32, this run holds torch.bfloat16"),
    "no pointer": ({}, "no checkpoint there"),
}


@pytest.mark.parametrize("mismatch", list(MISMATCH))
def test_mismatched_checkpoint_is_refused(mismatch, saved, tiny_corpus, tmp_path, capfd):
    prefix, tok = tiny_corpus
    root = tmp_path / "ckpt"
    shutil.copytree(saved[1], root)
    over, message = MISMATCH[mismatch]
    if mismatch == "no pointer":
        os.remove(root / checkpoint.POINTER)
    codes = run_distributed(_main, 1, model_flags(prefix, tok, **ITERS, **over, load=root), timeout=120)
    assert codes == [2]
    err = capfd.readouterr().err
    assert message in err, err


def _load_whole_model(rank, world, root):
    model = checkpoint.load_model(root)
    _, tensors = checkpoint.consolidated_state_dict(root)
    emb = model.word_embeddings.weight
    same = all(torch.equal(p[:tensors[model.global_name(n)].shape[0]], tensors[model.global_name(n)])
               for n, p in model.named_parameters())
    return model.tp_size, model.layer_range, tuple(emb.shape), bool(emb[512:].eq(0).all()), same


def test_load_model_gathers_any_layout_into_one_process(saved):
    tp, layers, emb_shape, padding_zero, same = run_distributed(_load_whole_model, 1, str(saved[1]))[0]
    assert (tp, layers, emb_shape) == (1, (0, 8), (576, 32))
    assert padding_zero and same


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("param", ["replicated", "row", "qkv-gqa", "vocab-padded"])
def test_pieces_of_all_tp_ranks_tile_each_global_tensor_once(tp, param):
    global_shape, dim, segments, vocab = {
        "replicated": ((32,), None, None, None),
        "row": ((32, 64), 1, None, None),
        "qkv-gqa": ((64, 32), 0, (32, 16, 16), None),
        "vocab-padded": ((500, 32), 0, None, 500),  # padded to 768 rows at tp 4: rank 3 holds padding only
    }[param]
    local = list(global_shape)
    if dim is not None:
        local[dim] = 768 // tp if vocab else global_shape[dim] // tp
    counts = {}
    for rank in range(tp):
        for pc in checkpoint.param_pieces("w", local, tp_dim=dim, segments=segments, tp_rank=rank, tp_size=tp,
                                          unpadded=vocab):
            hits = counts.setdefault(pc.key, torch.zeros(pc.global_shape, dtype=torch.int32))
            hits[tuple(slice(o, o + s) for o, s in zip(pc.offsets, pc.sizes))] += 1
            assert pc.local(torch.empty(local)).shape == pc.sizes
    copies = tp if dim is None else 1  # a replicated parameter is whole on every rank
    assert all(bool(h.eq(copies).all()) for h in counts.values())
    sizes = [h.shape[0] for _, h in sorted(counts.items())]
    assert sizes == (list(segments) if segments else [global_shape[0]])


class _CreatesAFile:
    """Unpickling this runs open(path, "w"): what a booby-trapped checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("victim", ["rank_00000.pt", "shard_00000.pt"])
def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(victim, tiny_corpus, tmp_path, capfd):
    prefix, tok = tiny_corpus
    save, marker = tmp_path / "ckpt", tmp_path / "pwned"
    train(1, model_flags(prefix, tok, save=save, **{"train-iters": 2}), tmp_path / "a.jsonl")
    path = save / "iter_0000002" / victim
    state = torch.load(path, weights_only=True)
    state[next(iter(state))] = _CreatesAFile(str(marker))
    torch.save(state, path)
    meta = json.loads((save / "iter_0000002" / "meta.json").read_text())
    meta["files"][victim] = os.path.getsize(path)  # the size matches: only the unpickler stands in the way
    (save / "iter_0000002" / "meta.json").write_text(json.dumps(meta))
    codes = run_distributed(_main, 1, model_flags(prefix, tok, load=save, **{"train-iters": 3}), timeout=120)
    assert codes == [2]
    err = capfd.readouterr().err
    assert f"{victim}: holds something other than tensors and plain data" in err and "nothing in it ran" in err, err
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the trap is real: an unsafe load would have run it
    assert marker.exists()


def _export(rank, world, root, out):
    from megaengine.tools import export_hf
    return export_hf.main(["--load", root, "--output", out])


def test_a_real_run_exports_its_tokenizer_and_load_hf_reads_it_back(tiny_corpus, tmp_path, capfd):
    """The checkpoint records the tokenizer the run used; the export writes it for transformers; --load-hf
    trains on with it, and refuses data encoded with another."""
    import transformers
    from megaengine.data import Tokenizer
    prefix, tok = tiny_corpus
    save, out = tmp_path / "ckpt", tmp_path / "hf"
    flags = {"swiglu": True, "position-embedding-type": "rope", "normalization": "RMSNorm",
             "disable-bias-linear": True, "untie-embeddings-and-output-weights": True}
    train(1, model_flags(prefix, tok, save=save, **flags, **{"train-iters": 2}), tmp_path / "a.jsonl")
    run_distributed(_export, 1, str(save), str(out))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(out)), Tokenizer(tok)
    from megaengine.data import IndexedDataset
    text = ours.decode(IndexedDataset(prefix)[0][:500].tolist())
    assert theirs(text).input_ids == ours.encode(text) and theirs.decode(ours.encode(text)) == text
    argv = [a for a in model_flags(prefix, tok, **flags, **{"train-iters": 1}) if a != tok]
    argv.remove("--tokenizer-model")
    assert sorted(train(1, argv + ["--load-hf", str(out)], tmp_path / "b.jsonl")) == [1]  # no --tokenizer-model
    other = tmp_path / "other.model"
    other.write_bytes(open(tok, "rb").read() + b"\0")
    codes = run_distributed(_main, 1, argv + ["--load-hf", str(out), "--tokenizer-model", str(other)], timeout=120)
    assert codes == [2] and "is not the tokenizer of --load-hf" in capfd.readouterr().err

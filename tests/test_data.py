"""The data pipeline: .bin/.idx format, tokenizer, preprocessing CLI, GPT samples, blending, loader, corpus."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from megaengine.data import (DTYPE_CODES, GPTDataset, IndexedDataset, IndexedDatasetBuilder, MicroBatchLoader,
                             Tokenizer, blending_indices, build_datasets, ensure_default_corpus,
                             iteration_indices, optimal_dtype, parse_data_path, parse_split, train_tokenizer)
from megaengine.data import corpus as corpus_mod
from megaengine.data.cache import build_once
from megaengine.data.dataset import build_gpt_indices, sample_starts, split_ranges
from megaengine.parallel import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_docs(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        builder.add_item(np.asarray(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def numbered_docs(lengths, base=0):
    """Documents whose tokens are their positions in the concatenated stream: samples show where they came from."""
    starts = np.concatenate([[0], np.cumsum(lengths)]) + base
    return [np.arange(starts[k], starts[k] + n) for k, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------------ .bin/.idx

def test_index_round_trip_and_megatron_layout(tmp_path):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [65000, 0]]
    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for doc in docs[:3]:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.add_document(np.array([65000, 0, 11]), lengths=[2, 1])  # one document of two sequences
    builder.finalize(prefix + ".idx")

    lengths = [3, 1, 5, 2, 1]
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 5)
                + struct.pack("<Q", 5) + np.array(lengths, np.int32).tobytes()
                + (np.cumsum([0] + lengths[:-1]) * 2).astype(np.int64).tobytes()
                + np.array([0, 1, 2, 3, 5], np.int64).tobytes())
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == np.array(sum(docs, []) + [11], np.uint16).tobytes()

    ds = IndexedDataset(prefix)
    assert len(ds) == 5 and ds.num_documents == 4 and ds.num_tokens == 12 and ds.dtype == np.uint16
    for i, seq in enumerate([[1, 2, 3], [4], [5, 6, 7, 8, 9], [65000, 0], [11]]):
        np.testing.assert_array_equal(ds[i], seq)
    np.testing.assert_array_equal(ds.get(2, offset=1, length=3), [6, 7, 8])
    np.testing.assert_array_equal(ds.get(2, offset=3), [8, 9])
    np.testing.assert_array_equal(ds.sequence_lengths, lengths)
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3, 5])


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_dtype_codes(tmp_path, code):
    dtype = DTYPE_CODES[code]
    ds = write_docs(str(tmp_path / "d"), [np.arange(5), np.arange(3) + 7], dtype)
    assert open(str(tmp_path / "d.idx"), "rb").read()[17] == code
    assert ds.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[1], np.arange(3) + 7)


def test_optimal_dtype_and_overflow(tmp_path):
    assert optimal_dtype(65499) is np.uint16 and optimal_dtype(65500) is np.int32
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(ValueError, match="outside uint16"):
        builder.add_item([1, 70000])


def test_bad_files_raise_config_error_naming_the_file(tmp_path):
    prefix = str(tmp_path / "d")
    write_docs(prefix, [np.arange(10), np.arange(6)])
    data = open(prefix + ".bin", "rb").read()
    with open(prefix + ".bin", "wb") as f:
        f.write(data[:-2])
    with pytest.raises(ConfigError, match=r"d\.bin: 30 bytes.*16 tokens of uint16 = 32 bytes.*truncated"):
        IndexedDataset(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(ConfigError, match=r"d\.bin not found.*--data-path"):
        IndexedDataset(prefix)
    with open(prefix + ".bin", "wb") as f:
        f.write(data)
    idx = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(b"TNTIDX\x00\x00\x00" + idx[9:])
    with pytest.raises(ConfigError, match=r"d\.idx: header .* differs"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx[:-8])
    with pytest.raises(ConfigError, match=r"d\.idx: .* truncated"):
        IndexedDataset(prefix)


# ------------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    source_dir = os.path.dirname(json.__file__)
    files = sorted(os.path.join(source_dir, f) for f in os.listdir(source_dir) if f.endswith(".py"))
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    return train_tokenizer(files, prefix, vocab_size=400)


def test_tokenizer_round_trip_and_special_ids(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    assert tok.vocab_size == 400 and tok.eod == 2 and tok.bos == 1
    for text in ["def f(x):\n\treturn  x  + 1\r\n", "héllo wörld ✓ 🚀 中文", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_tokenizer_trains_from_an_iterator(tmp_path):
    docs = (f"line {i} of document {i % 7}\n" * 3 for i in range(200))
    tok = Tokenizer(train_tokenizer(docs, str(tmp_path / "it"), vocab_size=300))
    assert tok.vocab_size == 300 and tok.decode(tok.encode("document 3\n")) == "document 3\n"


def test_tokenizer_bad_model_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--tokenizer-model .*nope\.model: no such file"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ConfigError, match=r"--tokenizer-model .*bad\.model: not a readable"):
        Tokenizer(str(bad))


# ------------------------------------------------------------------------------------------ preprocess

def run_preprocess(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megaengine.data.preprocess", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def expected_docs(tok, texts):
    return [tok.encode(t) + [tok.eod] for t in texts if t]


def test_preprocess_jsonl_two_workers(tmp_path, tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    records = [{"text": f"document {i}: " + "x = [1, 2]\n" * (i % 4), "title": f"T{i}"} for i in range(41)]
    records[5]["text"] = ""  # empty documents are skipped
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out" / "my")
    r = run_preprocess("--input", str(path), "--output-prefix", out, "--tokenizer-model", tokenizer_model,
                       "--json-keys", "text", "title", "--append-eod", "--workers", "2", "--log-interval", "10")
    assert r.returncode == 0, r.stderr
    assert "processed 40 documents" in r.stderr and "docs/s" in r.stderr and "tokens/s" in r.stderr
    assert "MB/s" in r.stderr and "done: 41 documents" in r.stderr
    for key in ("text", "title"):
        ds = IndexedDataset(f"{out}_{key}_document")
        assert ds.dtype == np.uint16
        want = expected_docs(tok, [rec[key] for rec in records])
        assert [list(ds[i]) for i in range(len(ds))] == want


def test_preprocess_plain_text_two_workers(tmp_path, tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    paragraphs = [f"Paragraph {i}.\nIt has two lines.\n" for i in range(25)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(paragraphs) + "\n\n")
    out = str(tmp_path / "book")
    r = run_preprocess("--input", str(path), "--output-prefix", out, "--tokenizer-model", tokenizer_model,
                       "--append-eod", "--workers", "2")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(out + "_text_document")
    assert [list(ds[i]) for i in range(len(ds))] == expected_docs(tok, paragraphs)
    assert tok.decode(ds[3][:-1]) == paragraphs[3]


def test_preprocess_reports_bad_input(tmp_path, tokenizer_model):
    from megaengine.data.preprocess import main
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tokenizer_model]
    with pytest.raises(SystemExit, match=r"in\.jsonl line 2: no key 'text'.*--json-keys"):
        main(args)
    with pytest.raises(SystemExit, match=r"--input .*missing\.jsonl: no such file"):
        main(args[:1] + [str(tmp_path / "missing.jsonl")] + args[2:])


# ------------------------------------------------------------------------------------------ GPT dataset

def megatron_sample_starts(sizes, document_index, seq_length, num_samples):
    """Megatron's helpers.cpp build_sample_idx loop, transcribed: the reference for the vectorised version."""
    out = [(0, 0)]
    d, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining:
            length = sizes[document_index[d]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                d, offset = d + 1, 0
        out.append((d, offset))
    return np.array(out)


def test_sample_starts_match_megatron_loop():
    rng = np.random.default_rng(0)
    for seq_length in (1, 3, 16):
        sizes = rng.integers(0, 12, size=40)
        sizes[[0, 5, 6]] = [0, 0, 0]
        document_index = rng.permutation(np.tile(np.arange(40), 2))
        n = (int(sizes.sum()) * 2 - 1) // seq_length
        np.testing.assert_array_equal(sample_starts(sizes, document_index, seq_length, n),
                                      megatron_sample_starts(sizes, document_index, seq_length, n))


def test_samples_are_the_shuffled_document_stream(tmp_path):
    lengths = [5, 1, 9, 3, 12, 7, 2, 8]
    docs = numbered_docs(lengths)
    indexed = write_docs(str(tmp_path / "d"), docs)
    seq = 6
    ds = GPTDataset(indexed, np.arange(len(docs)), seq, num_samples=20, seed=3)
    epochs = len(ds.document_index) // len(docs)
    assert epochs == 3  # 20 samples of 6 tokens (+1) need 121 tokens: three epochs of 47
    assert sorted(ds.document_index) == sorted(list(range(len(docs))) * epochs)
    stream = np.concatenate([docs[d] for d in ds.document_index])
    assert len(ds) == (len(stream) - 1) // seq >= 20
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds[i], stream[j * seq: j * seq + seq + 1])
        assert ds[i].dtype == np.int64 and len(ds[i]) == seq + 1
    assert sorted(ds.shuffle_index) == list(range(len(ds)))


def test_one_document_in_order_is_the_token_stream(tmp_path):
    indexed = write_docs(str(tmp_path / "d"), [np.arange(100)])
    ds = GPTDataset(indexed, [0], seq_length=10, num_samples=None, seed=0)
    assert len(ds) == 9
    assert sorted(tuple(ds[i]) for i in range(9)) == [tuple(range(10 * j, 10 * j + 11)) for j in range(9)]


def test_dataset_is_deterministic_by_seed(tmp_path):
    indexed = write_docs(str(tmp_path / "d"), numbered_docs([7, 3, 11, 5, 9, 4, 6]))
    def items(seed):
        ds = GPTDataset(indexed, np.arange(7), 4, num_samples=30, seed=seed)
        return [tuple(ds[i]) for i in range(len(ds))]
    assert items(1) == items(1)
    assert items(1) != items(2) and sorted(items(1)) != items(1)


def test_split_parsing_and_sizes(tmp_path):
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("969/30/1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(ConfigError, match="--split"):
            parse_split(bad)
    assert split_ranges(100, parse_split("80,10,10")) == [(0, 80), (80, 90), (90, 100)]
    assert split_ranges(7, parse_split("98,2,0")) == [(0, 7), (7, 7), (7, 7)]

    prefix = str(tmp_path / "d")
    write_docs(prefix, numbered_docs([5] * 100))
    train, valid, test = build_datasets([prefix], "80,10,10", 4, seed=0, num_samples=(50, 10, None))
    assert set(train.document_index) == set(range(80))
    assert set(valid.document_index) == set(range(80, 90)) and set(test.document_index) == set(range(90, 100))
    assert len(train) >= 50 and len(valid) >= 10 and len(test) == (50 - 1) // 4
    train, valid, test = build_datasets([prefix], "98,2,0", 4, seed=0, num_samples=(50, 10, 10))
    assert test is None and set(valid.document_index) == {98, 99}
    assert build_datasets([prefix], "98,2,0", 4, 0, (50, 0, 0))[1:] == (None, None)


def test_parse_data_path():
    assert parse_data_path(["a"]) == [(1.0, "a")]
    assert parse_data_path("0.7 a 0.3 b") == [(pytest.approx(0.7), "a"), (pytest.approx(0.3), "b")]
    assert parse_data_path(["2", "a", "6", "b"]) == [(0.25, "a"), (0.75, "b")]
    for bad in ([], ["0.5", "a", "b"], ["x", "a", "0.5", "b"], ["-1", "a", "1", "b"]):
        with pytest.raises(ConfigError, match="--data-path"):
            parse_data_path(bad)


def test_blending_proportions(tmp_path):
    for weights in ([0.7, 0.3], [0.5, 0.2, 0.3], [0.999, 0.001]):
        source, _ = blending_indices(weights, 2000)
        counts = np.stack([np.cumsum(source == j) for j in range(len(weights))], axis=1)
        ideal = np.arange(1, 2001)[:, None] * np.array(weights)[None]
        assert np.abs(counts - ideal).max() <= 1.0, weights

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_docs(a, numbered_docs([9] * 50))
    write_docs(b, numbered_docs([9] * 50, base=10_000))
    train, valid, _ = build_datasets(["0.7", a, "0.3", b], "90,10,0", 8, seed=5, num_samples=(400, 40, 0))
    assert len(train) == 400 and len(valid) == 40
    from_b = np.array([train[i][0] >= 10_000 for i in range(400)])
    assert abs(from_b.sum() - 120) <= 1 and np.all((train.dataset_index == 1) == from_b)


def test_index_cache_is_reused(tmp_path):
    prefix = str(tmp_path / "d")
    write_docs(prefix, numbered_docs([6] * 30))
    cache = str(tmp_path / "cache")
    first = build_datasets([prefix], "1", 5, 7, (40, None, None), cache_dir=cache)[0]
    (entry,) = os.listdir(cache)
    assert sorted(os.listdir(os.path.join(cache, entry))) == [
        "document_index.npy", "sample_index.npy", "shuffle_index.npy"]
    second = build_datasets([prefix], "1", 5, 7, (40, None, None), cache_dir=cache)[0]
    assert isinstance(second.shuffle_index, np.memmap)
    assert [tuple(first[i]) for i in range(len(first))] == [tuple(second[i]) for i in range(len(second))]
    build_datasets([prefix], "1", 5, 8, (40, None, None), cache_dir=cache)
    assert len(os.listdir(cache)) == 2  # another seed, another entry


def test_indices_need_tokens():
    with pytest.raises(ConfigError, match="too few"):
        build_gpt_indices(np.array([1, 0], np.int32), np.arange(2), 4, 10, 0)


# ------------------------------------------------------------------------------------------ loader

class Numbered:
    """Sample i is [100 i, 100 i + seq]: rows show which samples a batch holds."""

    def __init__(self, n, seq=5):
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.arange(100 * i, 100 * i + self.seq + 1)


def iteration_samples(loader, micro_batches):
    rows = []
    for _ in range(micro_batches):
        tokens, labels = loader.next_microbatch()
        assert tokens.dtype == torch.int64 and torch.equal(tokens[:, 1:], labels[:, :-1])
        rows += [int(t[0]) // 100 for t in tokens]
    return rows


def test_iteration_samples_do_not_depend_on_dp():
    data, micro, global_batch = Numbered(64), 2, 8
    single = MicroBatchLoader(data, micro, 0, 1)
    pair = [MicroBatchLoader(data, micro, r, 2) for r in range(2)]
    for it in range(3):
        want = iteration_samples(single, global_batch // micro)
        got = [iteration_samples(loader, global_batch // (micro * 2)) for loader in pair]
        assert sorted(got[0] + got[1]) == sorted(want) == list(range(it * 8, it * 8 + 8))
        assert got[0] == [s for r in iteration_indices(it, global_batch, micro, 0, 2) for s in r]
    assert single.consumed_samples == pair[0].consumed_samples == 24


def test_loader_resumes_exactly_and_stops_at_the_end():
    data = Numbered(20)
    loader = MicroBatchLoader(data, 2, 1, 2)
    for _ in range(2):
        loader.next_microbatch()
    state = loader.state_dict()
    rest = [loader.next_microbatch() for _ in range(3)]
    resumed = MicroBatchLoader(data, 2, 1, 2)
    resumed.load_state_dict(state)
    for (t1, l1), (t2, l2) in zip(rest, (resumed.next_microbatch() for _ in range(3))):
        assert torch.equal(t1, t2) and torch.equal(l1, l2)
    with pytest.raises(StopIteration):  # 20 samples = 5 steps of 4
        resumed.next_microbatch()
    with pytest.raises(ConfigError, match="--micro-batch-size"):
        MicroBatchLoader(data, 0, 0, 1)


# ------------------------------------------------------------------------------------------ corpus

def test_default_corpus_builds_once_and_is_reused(tmp_path, monkeypatch):
    cache, said = str(tmp_path / "cache"), []
    prefix, model = ensure_default_corpus(cache, vocab_size=512, max_bytes=200_000,
                                          say=lambda msg, **kw: said.append(msg))
    # The first run says what the seconds of building are for, before and after (issue 10.5).
    assert len(said) == 2 and said[0].startswith("first run: building the embedded corpus") and cache in said[0]
    assert said[1].startswith("built the embedded corpus") and "tokens" in said[1]
    ds, tok = IndexedDataset(prefix), Tokenizer(model)
    sources = corpus_mod.stdlib_sources(200_000)
    assert len(ds) == len(sources) > 3 and tok.vocab_size == 512
    assert sum(os.path.getsize(p) for p in sources) <= 200_000
    assert all("site-packages" not in p for p in sources) and sources == sorted(sources)
    first = open(sources[0], encoding="utf-8", errors="replace", newline="").read()
    assert ds[0][-1] == tok.eod and tok.decode(ds[0][:-1]) == first

    def no_rebuild(*args):
        raise AssertionError("the cached corpus should have been reused")
    monkeypatch.setattr(corpus_mod, "build_corpus", no_rebuild)
    assert ensure_default_corpus(cache, vocab_size=512, max_bytes=200_000, say=said.append) == (prefix, model)
    assert len(said) == 2  # reused: nothing to say
    with pytest.raises(AssertionError, match="reused"):  # other parameters, another corpus
        ensure_default_corpus(cache, vocab_size=600, max_bytes=200_000)
    assert len([d for d in os.listdir(cache) if d.startswith("corpus-")]) == 1  # the failed build left nothing


def test_build_once_ignores_unfinished_builds(tmp_path):
    final = str(tmp_path / "thing")
    os.makedirs(final + ".tmp-999-dead")  # what a killed build leaves behind

    def build(tmp):
        with open(os.path.join(tmp, "ok"), "w") as f:
            f.write("1")
    assert build_once(final, build) == final and os.listdir(final) == ["ok"]

"""GPT training samples over indexed datasets: Megatron's document/sample/shuffle indices, splits and blending.

A sample is seq_length + 1 consecutive tokens of the stream made by concatenating the documents in a shuffled
order (as many epochs of them as the requested samples need), so samples cross document boundaries and the
last token of one sample is the first of the next. With the same seed and documents, the three indices are
the ones Megatron-LM's GPTDataset builds (same RandomState calls), so the sample order matches.

`--split 98,2,0` cuts each dataset's documents into train/valid/test ranges; `--data-path 0.7 a 0.3 b`
blends several datasets, each sample's source chosen deterministically so that every prefix of the blend
follows the weights. Items are numpy int64 arrays: nothing here needs torch.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Sequence

import numpy as np

from megaengine.data.cache import build_once
from megaengine.data.indexed import IndexedDataset, bin_path, idx_path
from megaengine.errors import ConfigError

SPLIT_NAMES = ("train", "valid", "test")
# Megatron: a final epoch that would supply fewer than this fraction of an epoch's samples is shuffled on its
# own, so the earlier epochs' samples are not diluted by a handful of late ones.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
INDEX_FORMAT = "megaengine-gpt-indices-v1"


# ---------------------------------------------------------------------------------------------- flags

def parse_data_path(items: Sequence[str] | str) -> list[tuple[float, str]]:
    """`--data-path` as Megatron takes it: `PREFIX`, or `W1 PREFIX1 W2 PREFIX2 ...` -> [(weight, prefix)].

    Weights are normalised to sum to 1.
    """
    if isinstance(items, str):
        items = items.split()
    items = [str(x) for x in items]
    usage = ("expected PREFIX or WEIGHT PREFIX [WEIGHT PREFIX ...], "
             "e.g. --data-path 0.7 web_text_document 0.3 code_text_document")
    if not items:
        raise ConfigError(f"--data-path is empty: {usage}.")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ConfigError(f"--data-path {' '.join(items)}: {len(items)} values, not weight/prefix pairs: {usage}.")
    pairs = []
    for w, prefix in zip(items[::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"--data-path: {w!r} (before {prefix!r}) is not a weight: {usage}.") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"--data-path: weight {w} for {prefix!r} must be a positive number.")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(split: str | Sequence[float]) -> list[float]:
    """`--split 969,30,1` (or 98/2/0, or fewer parts) -> normalised [train, valid, test] fractions."""
    if isinstance(split, str):
        parts = [p for p in re.split(r"[,/]", split.strip()) if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {split!r}: expected numbers like 969,30,1 (train,valid,test).") from None
    else:
        values = [float(v) for v in split]
    if not 1 <= len(values) <= 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ConfigError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum, "
                          "like 969,30,1 (train,valid,test).")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """[start, stop) document ranges of the train/valid/test splits, rounded as Megatron rounds them."""
    bounds = np.concatenate([[0.0], np.cumsum(fractions)])
    bounds[-1] = 1.0
    edges = [int(round(b * num_documents)) for b in bounds]
    return [(edges[i], edges[i + 1]) for i in range(len(fractions))]


# ------------------------------------------------------------------------------------ the GPT indices

def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def document_order(doc_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                   separate_final_epoch: bool) -> np.ndarray:
    """The documents of all epochs, shuffled together (or the final epoch shuffled on its own)."""
    if separate_final_epoch and num_epochs > 1:
        head = document_order(doc_ids, num_epochs - 1, rng, False)
        return np.concatenate([head, document_order(doc_ids, 1, rng, False)])
    order = np.tile(np.asarray(doc_ids, dtype=np.int64), num_epochs)
    rng.shuffle(order)
    return order


def sample_starts(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                  num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (position in document_index, token offset) where each sample starts.

    Sample i covers stream tokens [i * seq_length, (i + 1) * seq_length] inclusive, so row i + 1 is also
    where sample i ends. Equal to what Megatron's helpers.cpp loop builds, empty documents included.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)[document_index]
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc = np.searchsorted(starts, positions, side="right") - 1
    doc[0] = 0  # Megatron's first row is (0, 0) even when that document is empty: same tokens, same array
    return np.stack([doc, positions - starts[doc]], axis=1)


def sample_order(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, total): [0, num_first) shuffled, then [num_first, total) shuffled on its own."""
    first = np.arange(num_first, dtype=np.int64)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(sequence_lengths: np.ndarray, doc_ids: np.ndarray, seq_length: int,
                      num_samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) for samples of seq_length + 1 tokens over doc_ids."""
    tokens_per_epoch = int(np.asarray(sequence_lengths, dtype=np.int64)[doc_ids].sum())
    if tokens_per_epoch < 2:
        raise ConfigError(f"{len(doc_ids)} documents hold {tokens_per_epoch} tokens: too few to draw samples "
                          "from; check --data-path and --split.")
    epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    per_epoch = (tokens_per_epoch - 1) // seq_length
    before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    separate_final = epochs > 1 and (num_samples - before_final
                                     < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch))
    rng = np.random.RandomState(seed)
    document_index = document_order(doc_ids, epochs, rng, separate_final)
    total = (epochs * tokens_per_epoch - 1) // seq_length
    sample_index = sample_starts(sequence_lengths, document_index, seq_length, total)
    shuffle_index = sample_order(before_final if separate_final else total, total, rng)
    return document_index, sample_index, shuffle_index


# ---------------------------------------------------------------------------------------- datasets

def _cache_key(dataset: IndexedDataset, doc_ids: np.ndarray, seq_length: int, num_samples, seed: int) -> str:
    stat = [os.stat(p) for p in (idx_path(dataset.prefix), bin_path(dataset.prefix))]
    description = "\n".join(map(str, [
        INDEX_FORMAT, os.path.realpath(dataset.prefix), [(s.st_size, s.st_mtime_ns) for s in stat],
        int(doc_ids[0]) if len(doc_ids) else None, len(doc_ids), seq_length, num_samples, seed]))
    return hashlib.sha256(description.encode()).hexdigest()[:20]


class GPTDataset:
    """Samples of seq_length + 1 tokens from documents `doc_ids` of an IndexedDataset, shuffled by seed.

    `num_samples` samples at least (whole epochs are built, so len() may be larger); None: one epoch. With a
    `cache_dir`, the indices are built by one rank of `group`, saved as .npy and memory-mapped by all.
    """

    ARRAYS = ("document_index", "sample_index", "shuffle_index")

    def __init__(self, dataset: IndexedDataset, doc_ids: np.ndarray, seq_length: int, num_samples: int | None,
                 seed: int, *, cache_dir: str | None = None, group=None, name: str = "train"):
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ConfigError(f"--seq-length must be a positive integer, got {seq_length!r}.")
        self.dataset, self.seq_length, self.name = dataset, seq_length, name
        doc_ids = np.asarray(doc_ids, dtype=np.int64)

        def build():
            return build_gpt_indices(dataset.sequence_lengths, doc_ids, seq_length, num_samples, seed)

        if cache_dir is None:
            arrays = build()
        else:
            key = _cache_key(dataset, doc_ids, seq_length, num_samples, seed)
            where = os.path.join(cache_dir, f"GPTDataset-{name}-{key}")

            def save(tmp):
                for array_name, array in zip(self.ARRAYS, build()):
                    np.save(os.path.join(tmp, array_name + ".npy"), array)
            build_once(where, save, group)
            arrays = [np.load(os.path.join(where, n + ".npy"), mmap_mode="r") for n in self.ARRAYS]
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        j = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = (map(int, self.sample_index[j]), map(int, self.sample_index[j + 1]))
        docs = self.document_index
        if d0 == d1:
            parts = [self.dataset.get(int(docs[d0]), o0, o1 - o0 + 1)]
        else:
            parts = ([self.dataset.get(int(docs[d0]), o0)]
                     + [self.dataset.get(int(docs[d])) for d in range(d0 + 1, d1)]
                     + [self.dataset.get(int(docs[d1]), 0, o1 + 1)])
        return np.concatenate(parts).astype(np.int64)


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of `size` blended samples following `weights`.

    The k-th sample of dataset j is due at time (k + 1/2) / w_j; samples are taken in order of due time, ties
    to the lower j. Every prefix of the blend then holds within about one sample of w_j * length from each
    dataset, the property Megatron's greedy error-minimising loop has, but vectorised.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    # No dataset can exceed w_j * size + n/2 samples in the first `size`, so these candidates suffice.
    counts = np.ceil(w * size).astype(np.int64) + len(w) + 1
    source = np.repeat(np.arange(len(w), dtype=np.int16), counts)
    rank = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    due = (rank + 0.5) / w[source]
    order = np.lexsort((source, due))[:size]
    return source[order], rank[order]


class BlendedDataset:
    """`size` samples drawn from several datasets in the proportions of `weights`."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets, self.weights = list(datasets), list(weights)
        self.dataset_index, self.dataset_sample_index = blending_indices(weights, size)
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for j, (ds, n) in enumerate(zip(self.datasets, needed)):
            if n and (ds is None or len(ds) < n):
                raise ValueError(f"blended source {j} supplies {0 if ds is None else len(ds)} samples, needs {n}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def _split_dataset(dataset: IndexedDataset, doc_range: tuple[int, int], seq_length: int, num_samples,
                   seed: int, cache_dir, group, name: str):
    start, stop = doc_range
    if stop <= start:
        return None
    return GPTDataset(dataset, np.arange(start, stop, dtype=np.int64), seq_length, num_samples, seed,
                      cache_dir=cache_dir, group=group, name=name)


def build_datasets(data_path, split, seq_length: int, seed: int,
                   num_samples: Sequence[int | None] = (None, None, None), *, cache_dir: str | None = None,
                   group=None) -> tuple:
    """(train, valid, test) datasets over `data_path` (flag list or [(weight, prefix)]), None where empty.

    num_samples[s] is the number of samples split s must supply (None: one epoch; 0: the split is skipped).
    Every rank of `group` must call this with the same arguments when `cache_dir` is set.
    """
    blend = (list(data_path) if data_path and all(isinstance(x, tuple) for x in data_path)
             else parse_data_path(data_path))
    fractions = parse_split(split)
    sources = [IndexedDataset(prefix) for _, prefix in blend]
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        if fractions[s] == 0 or wanted == 0:
            out.append(None)
            continue
        ranges = [split_ranges(len(ds), fractions)[s] for ds in sources]
        if len(sources) == 1:
            out.append(_split_dataset(sources[0], ranges[0], seq_length, wanted, seed, cache_dir, group, name))
            continue
        if wanted is None:
            raise ConfigError(f"blending {len(sources)} datasets needs the number of {name} samples "
                              "(set --train-iters/--eval-iters), not one epoch of each.")
        weights = [w for w, _ in blend]
        needed = np.bincount(blending_indices(weights, wanted)[0], minlength=len(sources))
        parts = []
        for (_, prefix), ds, doc_range, n in zip(blend, sources, ranges, needed):
            part = _split_dataset(ds, doc_range, seq_length, int(n), seed, cache_dir, group, name) if n else None
            if n and part is None:
                raise ConfigError(f"--data-path {prefix}: no documents fall in the {name} split "
                                  f"({len(ds)} documents, --split {split}); give it more data or change --split.")
            parts.append(part)
        out.append(BlendedDataset(parts, weights, wanted))
    return tuple(out)

"""Megatron-LM's indexed dataset: token ids in `<prefix>.bin`, their index in `<prefix>.idx`.

Byte-compatible with megatron/core/datasets/indexed_dataset.py, so data preprocessed by either tool loads in
the other. The .idx file, little endian:

    9 bytes   b"MMIDIDX\\x00\\x00"
    <Q        version, 1
    <B        dtype code of the tokens in .bin (DTYPE_CODES)
    <Q        sequence count S
    <Q        document count D (the entries of document_indices, a leading 0 included)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence byte offsets into .bin
    int64[D]  document indices: document k is sequences [document_indices[k], document_indices[k+1])

Data preprocessed at document level (the default) has one sequence per document.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable

import numpy as np

from megaengine.errors import ConfigError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(HEADER) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_PREFIX_HINT = ("--data-path takes the prefix of a <prefix>.bin/<prefix>.idx pair, without the extension, "
                "as written by megaengine.data.preprocess or Megatron's tools/preprocess_data.py")


def check_prefix(prefix: str) -> None:
    """Refuse a --data-path prefix whose .bin or .idx file is missing, naming the file."""
    for path in (idx_path(prefix), bin_path(prefix)):
        if not os.path.isfile(path):
            raise ConfigError(f"--data-path {prefix}: {path} not found. {_PREFIX_HINT}.")


def optimal_dtype(vocab_size: int) -> type:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 entries, int32 above."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def dtype_code(dtype) -> int:
    try:
        return CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no Megatron code; use one of "
                         f"{sorted(np.dtype(t).name for t in DTYPE_CODES.values())}") from None


def write_index(path: str, dtype, sequence_lengths, document_indices) -> None:
    """Write a .idx file for sequences of `sequence_lengths` tokens of `dtype`, stored back to back."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Append token sequences to a .bin file; `finalize(idx_path)` writes the matching .idx."""

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self._file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def _as_array(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.size and arr.dtype.kind in "iu" and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:  # a silent wrap-around would corrupt the data
                raise ValueError(f"token ids span [{lo}, {hi}], outside {self.dtype.name}; "
                                 f"build with dtype=optimal_dtype(vocab_size)")
        return arr.astype(self.dtype, copy=False).reshape(-1)

    def add_item(self, tokens) -> None:
        """Append one sequence (list, numpy array or CPU tensor of ids); end_document() closes a document."""
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(arr.size)

    def add_document(self, tokens, lengths: Iterable[int]) -> None:
        """Append a whole document made of sequences of `lengths` tokens."""
        arr = self._as_array(tokens)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise ValueError(f"lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
        self._file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)


def _read_header(path: str) -> tuple[np.dtype, int, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise ConfigError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte .idx header: truncated.")
    magic, version, code, sequences, documents = struct.unpack("<9sQBQQ", head)
    if magic != HEADER:
        raise ConfigError(f"{path}: header {magic!r} differs from Megatron's {HEADER!r}: not an .idx file "
                          f"of the mmap indexed format. {_PREFIX_HINT}.")
    if version != VERSION:
        raise ConfigError(f"{path}: index version {version}, expected {VERSION}.")
    if code not in DTYPE_CODES:
        raise ConfigError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}.")
    return np.dtype(DTYPE_CODES[code]), sequences, documents


def _mapped(path: str, dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx` through numpy memory maps.

    dataset[i] -> the tokens of sequence i; get(i, offset, length) -> part of it; sequence_lengths,
    sequence_pointers and document_indices are the .idx arrays.
    """

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        idx, data = idx_path(self.prefix), bin_path(self.prefix)
        check_prefix(prefix)
        self.dtype, sequences, documents = _read_header(idx)
        self._check_idx_size(idx, sequences, documents)
        self.sequence_lengths = _mapped(idx, np.int32, HEADER_BYTES, sequences)
        self.sequence_pointers = _mapped(idx, np.int64, HEADER_BYTES + 4 * sequences, sequences)
        self.document_indices = _mapped(idx, np.int64, HEADER_BYTES + 12 * sequences, documents)
        if documents < 1 or self.document_indices[-1] != sequences:
            last = int(self.document_indices[-1]) if documents else None
            raise ConfigError(f"{idx}: document indices end at {last}, but the file holds {sequences} sequences.")
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self._check_bin_size(data, idx)
        self._tokens = _mapped(data, self.dtype, 0, self.num_tokens)

    @staticmethod
    def _check_idx_size(idx: str, sequences: int, documents: int) -> None:
        expected = HEADER_BYTES + 12 * sequences + 8 * documents
        actual = os.path.getsize(idx)
        # Megatron's multimodal files append one int8 mode per sequence; we read past them.
        if actual not in (expected, expected + sequences):
            raise ConfigError(f"{idx}: {actual} bytes, but its header ({sequences} sequences, {documents} "
                              f"document indices) needs {expected}: the .idx is truncated or corrupt.")

    def _check_bin_size(self, data: str, idx: str) -> None:
        expected = self.num_tokens * self.dtype.itemsize
        actual = os.path.getsize(data)
        if actual != expected:
            kind = "truncated" if actual < expected else "longer than its index"
            raise ConfigError(f"{data}: {actual} bytes, but {idx} indexes {self.num_tokens} tokens of "
                              f"{self.dtype.name} = {expected} bytes: the .bin is {kind}. Re-run the "
                              "preprocessing, or pair the .bin with the .idx written alongside it.")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx (to its end when length is None)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences")
        idx = int(idx) % n
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + int(offset)
        if length is None:
            length = int(self.sequence_lengths[idx]) - int(offset)
        return self._tokens[start:start + int(length)]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    # Pickled as its prefix: memory maps are reopened in the receiving process.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype.name})")

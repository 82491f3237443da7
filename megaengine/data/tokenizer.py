"""SentencePiece tokenizer: train one on text (`train_tokenizer`) and encode/decode with it (`Tokenizer`).

Models are trained with byte fallback, so any text encodes, and with identity normalisation, so
decode(encode(text)) == text: source code and its whitespace survive exactly. Training "sentences" are runs
of whole lines (newlines included), so pieces like ":\\n" can be learned. The end-of-document id `eod` is the
model's eos id, as in Megatron's GPTSentencePieceTokenizer.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from megaengine.errors import ConfigError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHUNK_CHARS = 2048  # sentencepiece skips sentences longer than max_sentence_length (bytes): stay well below


def _chunks(lines: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Group consecutive lines (with their newlines) into pieces of about chunk_chars characters."""
    buf, size = [], 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= chunk_chars:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _file_lines(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    for path in paths:
        # newline="" keeps "\r\n" as written: the tokenizer must learn the text as it will see it.
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            yield from f


def _training_lines(inputs) -> Iterator[str]:
    """A path, a list/tuple of paths, or any other iterable of documents (str), as a stream of lines."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in inputs):
        missing = [os.fspath(p) for p in inputs if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"tokenizer training input {missing[0]!r}: no such file.")
        return _file_lines(inputs)
    return (line for doc in inputs for line in doc.splitlines(keepends=True))


def train_tokenizer(text_files_or_iterator, model_prefix: str, vocab_size: int = 4096, *,
                    model_type: str = "bpe", input_sentence_size: int = 50_000, num_threads: int | None = None,
                    character_coverage: float = 0.9999) -> str:
    """Train a sentencepiece model on text files (a path or a list of paths) or on an iterable of documents.

    Writes `<model_prefix>.model` (and `.vocab`) and returns the .model path. At most `input_sentence_size`
    chunks of ~2 KB, sampled uniformly, are used, which bounds the training time whatever the input size.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"--vocab-size must be a positive integer, got {vocab_size!r}.")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentences = _chunks(_training_lines(text_files_or_iterator))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_prefix=os.fspath(model_prefix), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=4 * CHUNK_CHARS,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train a tokenizer with --vocab-size {vocab_size}: {e}. "
                          "A vocabulary needs at least ~300 entries (256 bytes + specials + characters) and "
                          "no more than the text supports; change --vocab-size or give more text.") from e
    return os.fspath(model_prefix) + ".model"


def _load(model_path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(model_path):
        raise ConfigError(f"--tokenizer-model {model_path}: no such file. Pass the .model file written by "
                          "sentencepiece (or megaengine.data.train_tokenizer).")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(model_path)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises OSError or RuntimeError by version
        raise ConfigError(f"--tokenizer-model {model_path}: not a readable sentencepiece model ({e}). "
                          "Pass the .model file, not the .vocab, and check it is not truncated.") from e
    return sp


class Tokenizer:
    """A sentencepiece model: encode(str) -> list[int], decode(ids) -> str, vocab_size, eod, bos."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = os.fspath(model_path)
        self._sp = _load(self.model_path)

    # Pickled as its path: worker processes reload the model instead of copying a C++ object.
    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise ConfigError(f"--tokenizer-model {self.model_path} has no eos piece, needed as end-of-document "
                              "id (--append-eod); train it with an eos_id.")
        return eos

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once, on sentencepiece's own threads."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

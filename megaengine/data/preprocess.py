"""`python -m megaengine.data.preprocess`: text -> Megatron .bin/.idx files, with Megatron's flag names.

    python -m megaengine.data.preprocess --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-model tok.model --append-eod --workers 8

Input is JSON lines (one document per line, text under each of --json-keys) or plain text (documents
separated by blank lines, or one per line or per file: --text-document). Each key k is written to
`<output-prefix>_<k>_document.bin/.idx` (plain text: key "text"), loadable by Megatron-LM as well. Encoding
runs on a pool of --workers processes; document order is kept whatever the number of workers.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

from megaengine.data.indexed import IndexedDatasetBuilder, optimal_dtype
from megaengine.data.tokenizer import Tokenizer
from megaengine.errors import ConfigError

SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")
JSONL_EXTENSIONS = (".jsonl", ".json")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megaengine.data.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="input files or glob patterns")
    g.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: jsonl for *.jsonl/*.json files, text otherwise")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys of the JSON objects to extract")
    g.add_argument("--text-document", choices=["paragraph", "line", "file"], default="paragraph",
                   help="plain text: what one document is (paragraphs are separated by blank lines)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="GPTSentencePieceTokenizer",
                   help=f"accepted for Megatron compatibility: {' or '.join(SENTENCEPIECE_TYPES)}")
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path of the output files, without the suffix")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding processes")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    args = p.parse_args(argv)
    if args.tokenizer_type not in SENTENCEPIECE_TYPES:
        raise ConfigError(f"--tokenizer-type {args.tokenizer_type}: only sentencepiece models are supported "
                          f"({' or '.join(SENTENCEPIECE_TYPES)}); convert the vocabulary or train one with "
                          "megaengine.data.train_tokenizer.")
    for flag, value in (("--workers", args.workers), ("--log-interval", args.log_interval)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}.")
    return args


def expand_inputs(patterns: list[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not os.path.isfile(m)]
        if not matches or missing:
            raise ConfigError(f"--input {pattern}: no such file.")
        paths.extend(matches)
    return paths


def input_format(path: str, flag: str) -> str:
    if flag != "auto":
        return flag
    return "jsonl" if path.lower().endswith(JSONL_EXTENSIONS) else "text"


def text_documents(path: str, unit: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if unit == "file":
            yield f.read()
            return
        paragraph = []
        for line in f:
            if unit == "line":
                if line.strip():
                    yield line
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph)
                paragraph = []
        if paragraph:
            yield "".join(paragraph)


def read_documents(paths: list[str], fmt: str, unit: str) -> Iterator[tuple[str, str, int, str]]:
    """(format, path, line number, raw document) for every document of every input, in order."""
    for path in paths:
        kind = input_format(path, fmt)
        if kind == "jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield kind, path, n, line
        else:
            for doc in text_documents(path, unit):
                yield kind, path, 0, doc


# A pool worker's tokenizer, loaded once per process by the pool initializer rather than pickled per task.
_WORKER: dict = {}


def _init_worker(model_path: str, keys: list[str], append_eod: bool) -> None:
    _WORKER.update(tokenizer=Tokenizer(model_path), keys=keys, append_eod=append_eod)


def encode_document(item: tuple[str, str, int, str]) -> tuple[dict[str, list[int]], int]:
    """({key: token ids}, input bytes) of one document, in a pool worker."""
    kind, path, line_no, raw = item
    tokenizer, keys = _WORKER["tokenizer"], _WORKER["keys"]
    if kind == "jsonl":
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--input {path} line {line_no}: not valid JSON ({e}); use --input-format text "
                              "for plain text.") from None
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise ConfigError(f"--input {path} line {line_no}: no key {missing[0]!r}; choose the keys with "
                              f"--json-keys (this line has {sorted(record) if isinstance(record, dict) else []}).")
        texts = {k: str(record[k]) for k in keys}
    else:
        texts = {"text": raw}
    ids = {}
    for key, text in texts.items():
        doc = tokenizer.encode(text)
        if doc and _WORKER["append_eod"]:
            doc.append(tokenizer.eod)
        ids[key] = doc
    return ids, len(raw.encode("utf-8"))


class Progress:
    """Documents, tokens and bytes per second, printed to stderr every `interval` documents."""

    def __init__(self, interval: int):
        self.interval, self.start = interval, time.perf_counter()
        self.docs = self.tokens = self.bytes = 0

    def add(self, tokens: int, nbytes: int) -> None:
        self.docs += 1
        self.tokens += tokens
        self.bytes += nbytes
        if self.docs % self.interval == 0:
            print(f"processed {self.docs} documents ({self.rates()})", file=sys.stderr, flush=True)

    def rates(self) -> str:
        s = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.docs / s:.1f} docs/s, {self.tokens / s:.0f} tokens/s, "
                f"{self.bytes / s / 2**20:.2f} MB/s")


def preprocess(args: argparse.Namespace) -> dict:
    """Encode the inputs and write the .bin/.idx pairs; return a summary."""
    paths = expand_inputs(args.input)
    tokenizer = Tokenizer(args.tokenizer_model)
    if args.append_eod:
        tokenizer.eod  # noqa: B018 - fails early, with the model named, when it has no eos piece
    formats = {input_format(p, args.input_format) for p in paths}
    keys = list(args.json_keys) if formats == {"jsonl"} else ["text"]
    if len(formats) > 1:
        raise ConfigError(f"--input mixes JSON lines and plain text files ({paths}); preprocess them "
                          "separately, or force one reading with --input-format.")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    dtype = optimal_dtype(tokenizer.vocab_size)
    outputs = {k: f"{args.output_prefix}_{k}_document" for k in keys}
    builders = {k: IndexedDatasetBuilder(prefix + ".bin", dtype) for k, prefix in outputs.items()}
    progress, empty = Progress(args.log_interval), 0
    documents = read_documents(paths, args.input_format, args.text_document)
    with multiprocessing.Pool(args.workers, initializer=_init_worker,
                              initargs=(args.tokenizer_model, keys, args.append_eod)) as pool:
        for ids, nbytes in pool.imap(encode_document, documents, chunksize=32):
            for key, doc in ids.items():
                if doc:
                    builders[key].add_item(doc)
                    builders[key].end_document()
                else:
                    empty += 1
            progress.add(sum(map(len, ids.values())), nbytes)
    for key, prefix in outputs.items():
        builders[key].finalize(prefix + ".idx")
    print(f"done: {progress.docs} documents, {progress.tokens} tokens, {progress.bytes / 2**20:.2f} MB in "
          f"{time.perf_counter() - progress.start:.1f}s ({progress.rates()}); skipped {empty} empty; wrote "
          + ", ".join(p + ".bin/.idx" for p in outputs.values()), file=sys.stderr, flush=True)
    return {"documents": progress.docs, "tokens": progress.tokens, "bytes": progress.bytes,
            "empty": empty, "outputs": outputs, "dtype": str(dtype.__name__)}


def main(argv=None) -> None:
    try:
        preprocess(get_args(argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

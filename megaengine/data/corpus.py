"""The embedded default corpus: this machine's Python standard library source, tokenized and cached.

With no --data-path, training reads the stdlib's *.py files (sorted by path, site-packages, tests and codec
tables left out, capped at a few MB). On first use one rank trains a sentencepiece tokenizer on them and
writes `stdlib_text_document.bin/.idx` into `<cache>/corpus-<hash>/`; every later run reuses it. The hash
covers the files' contents and the build parameters, so another Python version gets its own directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import time

import sentencepiece as spm

from megaengine.data.cache import build_once
from megaengine.data.indexed import IndexedDatasetBuilder, optimal_dtype
from megaengine.data.tokenizer import Tokenizer, train_tokenizer
from megaengine.errors import ConfigError

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 4 * 2**20
CORPUS_FORMAT = "megaengine-stdlib-corpus-v1"
# Installed packages are not the stdlib; tests and codec tables are large, repetitive and unlike real code.
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                          "encodings"})
DATA_NAME = "stdlib_text_document"
TOKENIZER_NAME = "tokenizer"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_sources(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> list[str]:
    """Paths of the stdlib's .py files, sorted by relative path, while their total stays within max_bytes."""
    root = root or stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    found.sort(key=lambda p: os.path.relpath(p, root))
    chosen, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def read_sources(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            texts.append(f.read())
    return texts


def corpus_key(paths: list[str], root: str, vocab_size: int, max_bytes: int) -> str:
    h = hashlib.sha256(f"{CORPUS_FORMAT}|{vocab_size}|{max_bytes}|sentencepiece {spm.__version__}".encode())
    for path in paths:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def default_cache_root() -> str:
    return os.environ.get("MEGAENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megaengine")


def build_corpus(out_dir: str, texts: list[str], vocab_size: int) -> dict:
    """Train the tokenizer on `texts` and write them, one document each with an end-of-document id."""
    t0 = time.perf_counter()
    model = train_tokenizer(iter(texts), os.path.join(out_dir, TOKENIZER_NAME), vocab_size)
    t1 = time.perf_counter()
    tokenizer = Tokenizer(model)
    prefix = os.path.join(out_dir, DATA_NAME)
    builder = IndexedDatasetBuilder(prefix + ".bin", optimal_dtype(tokenizer.vocab_size))
    tokens = 0
    for doc in tokenizer.encode_batch(texts):
        doc.append(tokenizer.eod)
        builder.add_item(doc)
        builder.end_document()
        tokens += len(doc)
    builder.finalize(prefix + ".idx")
    t2 = time.perf_counter()
    info = {"documents": len(texts), "characters": sum(map(len, texts)), "tokens": tokens,
            "vocab_size": tokenizer.vocab_size, "tokenizer_seconds": round(t1 - t0, 3),
            "encode_seconds": round(t2 - t1, 3)}
    with open(os.path.join(out_dir, "corpus.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def ensure_default_corpus(cache_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, group=None,
                          max_bytes: int = DEFAULT_MAX_BYTES, say=None) -> tuple[str, str]:
    """(data prefix, tokenizer model path) of the stdlib corpus, built on first use into the cache.

    One rank (global rank 0 of `group`, or of the world) builds while the others wait on a barrier, so every
    rank of `group` must call this. `cache_dir` defaults to $MEGAENGINE_CACHE or ~/.cache/megaengine. `say`
    (e.g. print on rank 0) is told what the first run is doing while it builds, and what it built.
    """
    root = stdlib_root()
    paths = stdlib_sources(max_bytes, root)
    if not paths:
        raise ConfigError(f"no Python sources under {root} to build the default corpus from; pass --data-path.")
    cache_root = cache_dir or default_cache_root()
    where = os.path.join(cache_root, f"corpus-{corpus_key(paths, root, vocab_size, max_bytes)}")
    say = say or (lambda *a, **k: None)

    def build(tmp):
        say(f"first run: building the embedded corpus from {len(paths)} files of the standard library "
            f"({root}): training a {vocab_size}-token sentencepiece tokenizer, then writing a .bin/.idx dataset "
            f"into {where} (about 10 s; later runs reuse it)", flush=True)
        info = build_corpus(tmp, read_sources(paths), vocab_size)
        say(f"built the embedded corpus: {info['documents']} documents, {info['tokens']:,} tokens, in "
            f"{info['tokenizer_seconds'] + info['encode_seconds']:.1f} s", flush=True)
    build_once(where, build, group)
    return os.path.join(where, DATA_NAME), os.path.join(where, TOKENIZER_NAME + ".model")

"""Shared fixtures: a tiny sentencepiece tokenizer and a Megatron .bin/.idx corpus, built once per session."""
import glob
import os
import sysconfig

# Triton reads TRITON_INTERPRET when it is first imported (torch._dynamo imports it early), so the kernel
# tests can run on CPU only if this is set before anything imports torch. Set TRITON_INTERPRET=0 on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(data prefix, tokenizer model path) over ~200 KB of the standard library's source."""
    from megaengine.data import IndexedDatasetBuilder, Tokenizer, train_tokenizer
    from megaengine.data.indexed import bin_path, idx_path, optimal_dtype
    root = tmp_path_factory.mktemp("corpus")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    files += sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")))[:10]
    docs = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    model = train_tokenizer(iter(docs), str(root / "tok"), vocab_size=512)
    tok = Tokenizer(model)
    prefix = str(root / "tiny_text_document")
    builder = IndexedDatasetBuilder(bin_path(prefix), dtype=optimal_dtype(tok.vocab_size))
    for doc in docs:
        builder.add_item(tok.encode(doc) + [tok.eod])
        builder.end_document()
    builder.finalize(idx_path(prefix))
    return prefix, model

"""Data built once per group: the default corpus and the cached GPT indices, on 2 gloo ranks."""
import os

import numpy as np

from megaengine.testing import run_distributed


def _build_once_case(rank, world, cache):
    import torch.distributed as dist

    from megaengine.data import GPTDataset, IndexedDataset, ensure_default_corpus
    from megaengine.data import corpus as corpus_mod
    from megaengine.data import dataset as dataset_mod

    log = os.path.join(cache, f"builds-{rank}.txt")
    real_corpus, real_indices = corpus_mod.build_corpus, dataset_mod.build_gpt_indices

    def counted(real, what):
        def call(*args, **kwargs):
            with open(log, "a") as f:
                f.write(what + "\n")
            return real(*args, **kwargs)
        return call

    corpus_mod.build_corpus = counted(real_corpus, "corpus")
    dataset_mod.build_gpt_indices = counted(real_indices, "indices")
    prefix, model = ensure_default_corpus(cache, vocab_size=400, max_bytes=100_000, group=dist.group.WORLD)
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, np.arange(len(indexed)), 16, 200, seed=1, cache_dir=os.path.join(cache, "idx"))
    builds = open(log).read().split() if os.path.exists(log) else []
    return prefix, model, builds, [ds[i].tolist() for i in (0, 7, len(ds) - 1)]


def test_default_corpus_and_indices_built_by_one_rank(tmp_path):
    results = run_distributed(_build_once_case, 2, str(tmp_path))
    (p0, m0, builds0, samples0), (p1, m1, builds1, samples1) = results
    assert (p0, m0, samples0) == (p1, m1, samples1)
    assert builds0 == ["corpus", "indices"] and builds1 == []

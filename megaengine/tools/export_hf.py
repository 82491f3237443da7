"""`python -m megaengine.tools.export_hf --load CKPT --output DIR`: a megaengine checkpoint of any layout as
a Hugging Face model directory (config.json, model.safetensors, generation_config.json and the tokenizer the
run trained with, which AutoTokenizer and `pipeline("text-generation", model=DIR)` load)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from megaengine.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megaengine.tools.export_hf", description=__doc__)
    p.add_argument("--load", required=True, help="megaengine checkpoint directory (any tp/pp/dp layout)")
    p.add_argument("--output", required=True, help="directory to write the Hugging Face model into")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece model the run trained with (default: the one the checkpoint records)")
    g.add_argument("--no-tokenizer", action="store_true", help="write the weights only, no tokenizer files")
    return p.parse_args(argv)


def checkpoint_tokenizer(meta: dict) -> str | None:
    """The sentencepiece model a checkpoint's run trained with: meta["tokenizer_model"] (recorded for every
    run), else the --tokenizer-model in its args (older checkpoints), else, for an older run on the embedded
    corpus, that corpus's cached tokenizer (rebuilt by the same call as training if the cache was cleared)."""
    args = meta.get("args") or {}
    path = meta.get("tokenizer_model") or args.get("tokenizer_model")
    if path or not args or args.get("data_path"):
        return path
    from megaengine.data import ensure_default_corpus
    from megaengine.data.corpus import DEFAULT_VOCAB_SIZE
    return ensure_default_corpus(cache_dir=args.get("data_cache_dir"),
                                 vocab_size=args.get("vocab_size", DEFAULT_VOCAB_SIZE))[1]


def find_tokenizer(args: argparse.Namespace) -> str | None:
    if args.no_tokenizer or args.tokenizer_model:
        return args.tokenizer_model
    from megaengine.checkpoint import load_meta
    path = checkpoint_tokenizer(load_meta(args.load)[1])
    if path is None:
        raise ConfigError(f"--load {args.load}: the checkpoint records no tokenizer; pass --tokenizer-model PATH "
                          "(the sentencepiece model the run trained with) or --no-tokenizer.")
    if not os.path.isfile(path):
        raise ConfigError(f"--load {args.load}: the checkpoint's tokenizer {path} no longer exists; pass "
                          "--tokenizer-model PATH (a copy of it) or --no-tokenizer.")
    return path


def main(argv=None) -> list[str]:
    import megaengine
    from megaengine.tools.hf import export
    args = parse_args(argv)
    tokenizer = find_tokenizer(args)
    model = megaengine.load_model(args.load, device="cpu")
    paths = export(model, model.config, args.output, dtype=DTYPES[args.dtype], tokenizer_model=tokenizer)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"megaengine: error: {e}", file=sys.stderr)
        sys.exit(2)

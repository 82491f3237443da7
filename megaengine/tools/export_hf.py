"""`python -m megaengine.tools.export_hf --load CKPT --output DIR`: a megaengine checkpoint of any layout as
a Hugging Face model directory (config.json, model.safetensors, and the tokenizer model when known)."""
from __future__ import annotations

import argparse
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megaengine.tools.export_hf", description=__doc__)
    p.add_argument("--load", required=True, help="megaengine checkpoint directory (any tp/pp/dp layout)")
    p.add_argument("--output", required=True, help="directory to write the Hugging Face model into")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece model to copy as tokenizer.model (default: the checkpoint's --tokenizer-model)")
    return p.parse_args(argv)


def checkpoint_tokenizer(root: str) -> str | None:
    """The --tokenizer-model the checkpoint was trained with, if it names one that still exists."""
    from megaengine.checkpoint import load_meta
    _, meta = load_meta(root)
    path = meta.get("tokenizer_model") or (meta.get("args") or {}).get("tokenizer_model")
    return path if path and os.path.exists(path) else None


def main(argv=None) -> list[str]:
    import megaengine
    from megaengine.tools.hf import export
    args = parse_args(argv)
    model = megaengine.load_model(args.load, device="cpu")
    tokenizer = args.tokenizer_model or checkpoint_tokenizer(args.load)
    paths = export(model, model.config, args.output, dtype=DTYPES[args.dtype], tokenizer_model=tokenizer)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()

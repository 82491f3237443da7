"""Pretrain a GPT: `torchrun --nproc_per_node N pretrain_gpt.py --config configs/gpt-tiny.json --tp 2 ...`.

Thin on purpose: flags and the loop live in megaengine.training.
"""
import sys

from megaengine.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())

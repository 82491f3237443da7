"""pretrain_gpt.py with rank 1 stuck before its second step (for the collective-timeout test)."""
import sys
import time

import torch.distributed as dist

from megaengine.training import trainer

step, calls = trainer.train_step, []


def stuck_train_step(*args, **kwargs):
    calls.append(1)
    if dist.get_rank() == 1 and len(calls) == 2:
        time.sleep(3600)
    return step(*args, **kwargs)


trainer.train_step = stuck_train_step
sys.exit(trainer.main(sys.argv[1:]))

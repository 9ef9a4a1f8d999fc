"""Run train_ldm.py's trainer, but make process 1 fail while it writes its shards of the second sharded
checkpoint (for the FSDP failed-save test)."""

import sys

import torch.distributed.checkpoint as dcp

from ldm.trainer.train import main

real = dcp.HuggingFaceStorageWriter.write_data
calls = {"n": 0}


def failing(self, plan, planner):
    import torch.distributed as dist

    calls["n"] += 1
    if dist.get_rank() == 1 and calls["n"] == 2:
        raise RuntimeError("injected failure while saving on process 1")
    return real(self, plan, planner)


dcp.HuggingFaceStorageWriter.write_data = failing
sys.exit(main())

"""Run train_ldm.py's trainer, but make process 1 fail at its third step (for the two-process fault test)."""

import sys

import ldm.trainer.objective
from ldm.trainer.train import main

real = ldm.trainer.objective.LatentDiffusionObjective.__call__
calls = {"n": 0}


def failing(self, unet, parts, device):
    import torch.distributed as dist

    calls["n"] += 1
    if dist.is_initialized() and dist.get_rank() == 1 and calls["n"] == 3:
        raise RuntimeError("injected failure on process 1")
    return real(self, unet, parts, device)


ldm.trainer.objective.LatentDiffusionObjective.__call__ = failing
sys.exit(main())

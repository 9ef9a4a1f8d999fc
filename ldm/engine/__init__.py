"""The run engine both trainers share: typed config loading and checks, the accelerator, the training loop with
its cadence, checkpoints, metrics and the closing summary, and how stops and errors reach the command line. It
knows nothing of diffusion."""

"""The command line of a trainer: ``--config PRESET.yaml`` followed by ``key=value`` overrides; errors are
reported as `ldm.engine.errors` says."""

from __future__ import annotations

import argparse
import logging
import os

from ldm.engine.config import load_config
from ldm.engine.errors import die_with_parent, user_errors


def run(config_cls, train, description: str, argv=None):
    """Parse ``--config`` and overrides into ``config_cls``, set up logging, and call ``train(cfg)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML preset; its keys override the typed defaults")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 name=quick")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("datasets", "filelock", "fsspec", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    die_with_parent()
    with user_errors(args.debug):
        return train(load_config(config_cls, args.config, args.overrides))

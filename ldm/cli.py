"""Command-line entry points: `--config PRESET.yaml` followed by `key=value` overrides."""

from __future__ import annotations

import argparse
import logging
import os


def _parse(description: str, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML preset; its keys override the typed defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 name=quick")
    return parser.parse_args(argv)


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("datasets", "filelock", "fsspec", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def autoencoder_main(argv=None) -> None:
    from autoencoder.config import AutoencoderConfig
    from autoencoder.train import train
    from ldm.config import load_config

    args = _parse("Train a KL autoencoder (the latent space of a latent diffusion model).", argv)
    _setup_logging()
    train(load_config(AutoencoderConfig, args.config, args.overrides))


def train_main(argv=None) -> None:
    from ldm.config import LDMConfig, load_config
    from ldm.train import train

    args = _parse("Train a text-to-image latent diffusion model.", argv)
    _setup_logging()
    train(load_config(LDMConfig, args.config, args.overrides))

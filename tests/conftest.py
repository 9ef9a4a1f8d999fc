"""Shared fixtures: one tiny VAE folder and one 96-image shapes folder per test session, a config maker, and one
intra-op thread for tiny models."""

import os
from pathlib import Path

import pytest
import torch

# Tests build every component in code; never reach out to the Hugging Face Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    from tiny_models import tiny_vae

    return tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from ldm.data.builtin import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_images=96, seed=0)


@pytest.fixture
def tiny_cfg(tmp_path, tiny_vae_dir, data_dir):
    """``tiny_cfg(*overrides)``: the tiny preset on the shared VAE and data, writing under this test's folder."""
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig

    def make(*extra, data=None, vae=None):
        return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [
            f"output_dir={tmp_path}", f"model.vae={vae or tiny_vae_dir}", f"data.dataset={data or data_dir}",
            f"data.cache_dir={tmp_path / 'cache'}", "sample.seeds=[0]", "sample.num_inference_steps=2",
            "train.tensorboard=false", *extra])

    return make


@pytest.fixture
def one_thread():
    """Tiny models on one intra-op thread: with 2 (often shared) cores, threads spin-wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Training on the community trainers' layouts: a folder captioned by caption files trains, and a mix of two
sources (repeats, an N_name folder, tag captions shuffled every step) trains and resumes bit-identically."""

import shutil

import torch
from safetensors.torch import load_file
from tiny_models import sidecar_folder

from ldm.engine.records import read_metrics
from ldm.trainer.train import train

UNET = "pipeline/unet/diffusion_pytorch_model.safetensors"


def test_a_folder_of_caption_files_trains(tmp_path, tiny_cfg, data_dir):
    folder = sidecar_folder(tmp_path / "kohya", data_dir, n=24, repeat_folder="2_blob")
    cfg = tiny_cfg("train.max_steps=3", "train.batch_size=4", "data.validation_num_images=4", data=folder)
    train(cfg)
    assert read_metrics(cfg.run_dir / "metrics.jsonl")[-1]["steps"] == 3


def test_a_mix_of_sources_with_tag_shuffling_trains_and_resumes_bit_identically(tmp_path, tiny_cfg, data_dir):
    a = sidecar_folder(tmp_path / "a", data_dir, n=12, repeat_folder="3_blob")
    b = sidecar_folder(tmp_path / "b", data_dir, n=16, start=40)
    mix = (f"data.sources=[{{dataset: {a}, repeats: 2, shuffle_tags: true, keep_tokens: 1}}, "
           f"{{dataset: {b}, tag_dropout: 0.2}}]")
    common = (mix, "train.max_steps=6", "train.checkpoint_every=3", "train.batch_size=4",
              "data.validation_fraction=0.1", "data.validation_num_images=4")
    straight = tiny_cfg(*common, "name=straight")
    train(straight)
    resumed = tiny_cfg(*common, "name=resumed", "train.resume=latest")
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.run_dir / "checkpoints" / "step-3", resumed.run_dir / "checkpoints" / "step-3")
    shutil.copy(straight.run_dir / "config.yaml", resumed.run_dir / "config.yaml")
    train(resumed)
    x, y = load_file(straight.run_dir / UNET), load_file(resumed.run_dir / UNET)
    assert all(torch.equal(x[k], y[k]) for k in x)

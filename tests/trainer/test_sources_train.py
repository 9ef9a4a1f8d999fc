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
    long = next(folder.glob("*.txt"))
    long.write_text("sks, " + ", ".join(["a red circle"] * 12))  # far past the tiny tokenizer's 16 tokens
    cfg = tiny_cfg("train.max_steps=3", "train.batch_size=4", "data.validation_num_images=4", data=folder)
    result = train(cfg)
    last = read_metrics(cfg.run_dir / "metrics.jsonl")[-1]
    assert last["steps"] == 3 and result["captions_truncated"] >= 1  # named in the summary and the last row
    assert last["captions_truncated"] == result["captions_truncated"]


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


def test_a_regularisation_source_is_mixed_into_every_step_as_class_images(tmp_path, tiny_cfg, data_dir):
    from ldm.data.splits import load_splits, regularisation_split

    subject = sidecar_folder(tmp_path / "subject", data_dir, n=8)
    reg = sidecar_folder(tmp_path / "reg", data_dir, n=12, start=40)
    cfg = tiny_cfg(f"data.sources=[{{dataset: {subject}, repeats: 2}}, {{dataset: {reg}, regularisation: true}}]",
                   "train.max_steps=3", "train.batch_size=4", "dreambooth.prior_loss_weight=0.5",
                   "train.log_every=1")
    assert len(load_splits(cfg)[0]) == 8 and len(regularisation_split(cfg)) == 12
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "prior_loss" in r]
    assert len(rows) == 3 and all(r["prior_loss"] > 0 for r in rows)

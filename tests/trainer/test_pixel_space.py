"""Pixel-space DDPM (``model.vae: none``) through the same trainer, and the original DPM objective: the
variational bound alone with importance-sampled timesteps, whose loss history resumes exactly."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.diffusion.timesteps import ImportanceTimesteps
from ldm.engine.config import load_config
from ldm.engine.records import read_metrics
from ldm.eval.likelihood import nll
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train
from pipelines import LDMPipeline

PIXEL_VLB = ["model.vae=none", "diffusion.learned_variance=true", "diffusion.loss_type=vlb",
             "diffusion.timestep_sampling=importance", "diffusion.num_train_timesteps=4"]


def _cfg(tmp_path, data_dir, *extra):
    # At 32x32 no attention in the first level (1024 tokens would dominate a CPU test).
    return load_config(LDMConfig, "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"data.dataset={data_dir}", f"data.cache_dir={tmp_path / 'cache'}",
        "model.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
        "model.unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
        "sample.seeds=[0]", "sample.num_inference_steps=2", "train.tensorboard=false", *extra])


def test_pixel_space_run_exports_a_pipeline_without_a_vae(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "model.vae=none", "diffusion.learned_variance=true", "train.max_steps=30")
    result = train(cfg)
    assert result["steps"] == 30
    folder = cfg.run_dir / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == [None, None] and not (folder / "vae").exists()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is True and sched["variance_type"] == "learned_range"
    pipe = LDMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is None and pipe.unet.config.in_channels == 3 and pipe.unet.config.out_channels == 6
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0)
    images = pipe(["a red circle at the top left"], generator=torch.Generator().manual_seed(0), output_type="np",
                  **kwargs).images
    raw = pipe(["a red circle at the top left"], generator=torch.Generator().manual_seed(0), output_type="latent",
               **kwargs).images
    assert images.shape == (1, 32, 32, 3)
    # No decoder: the image is the denoised sample, mapped from [-1, 1] to [0, 1].
    np.testing.assert_allclose(images, (raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    # The cache held the pixels themselves (std 0), keyed apart from any VAE's latents.
    val = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_vb" in r]
    assert val and all(np.isfinite(r["val_vb"]) for r in val)
    bound = nll(folder, "shapes", num_images=2, stride=50)
    assert bound["space"].startswith("pixels") and np.isfinite(bound["nll_bpd"])
    assert 0 < bound["decoder_bpd"] <= 8.1  # an 8-bit pixel costs at most ~8 bits under a broad Gaussian


def test_importance_sampler_follows_the_second_moment_of_each_loss():
    s = ImportanceTimesteps(4, history=2, uniform=0.0)
    g = torch.Generator().manual_seed(0)
    t, w = s.sample(8, g)
    assert torch.equal(w, torch.ones(8))  # uniform until every t has a full history
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0]))
    assert torch.allclose(s.probs(), torch.full((4,), 0.25, dtype=torch.float64))
    s.update(torch.tensor([3, 0]), torch.tensor([4.0, 3.0]))  # t=0's oldest loss (1) drops: history [1, 3]
    rms = torch.tensor([(1 + 9) / 2, 4, 9, 16], dtype=torch.float64).sqrt()
    torch.testing.assert_close(s.probs(), rms / rms.sum())
    t, w = s.sample(20_000, g)
    freq = torch.bincount(t, minlength=4).double() / 20_000
    assert (freq - rms / rms.sum()).abs().max() < 0.02
    torch.testing.assert_close(w.double(), 1 / (4 * (rms / rms.sum())[t]), rtol=1e-6, atol=0)
    other = ImportanceTimesteps(4, history=2)
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.losses, s.losses) and torch.equal(other.counts, s.counts)


def test_vlb_with_importance_sampling_resumes_exactly(tmp_path, data_dir):
    """The bound alone, importance-sampled (T = 4, so the history fills within the run): a run resumed from its
    step-6 checkpoint ends on the same weights as the run that went straight through."""
    straight = _cfg(tmp_path, data_dir, *PIXEL_VLB, "train.max_steps=12", "train.checkpoint_every=6", "name=a")
    train(straight)
    ckpt = straight.run_dir / "checkpoints" / "step-6"
    state = load_file(str(ckpt / "timestep_importance.safetensors"))
    assert int(state["timestep_importance.counts"].min()) == 10  # 6 steps x 16 images over 4 timesteps: the history is full
    resumed = _cfg(tmp_path, data_dir, *PIXEL_VLB, "train.max_steps=12", "name=b", f"train.resume={ckpt}")
    train(resumed)
    a = load_file(str(straight.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in read_metrics(straight.run_dir / "metrics.jsonl") if "epoch" in r]
    assert losses and all(np.isfinite(losses))


def test_vlb_needs_a_learned_variance(tmp_path, data_dir):
    from ldm.trainer.config import check_config

    with pytest.raises(ValueError, match="diffusion.loss_type"):
        check_config(_cfg(tmp_path, data_dir, "diffusion.loss_type=vlb"))

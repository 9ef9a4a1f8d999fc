"""One short training run end to end on CPU: loss falls, the exported folder loads, images come out."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from ldm.engine.config import load_config
from ldm.engine.records import read_metrics
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train
from pipelines import LDMPipeline


def _cfg(tmp_path, vae, data, *extra):
    return load_config(LDMConfig, "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"model.vae={vae}", f"data.dataset={data}",
        f"data.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("extra", [[], ["diffusion.learned_variance=true", "diffusion.beta_schedule=squaredcos_cap_v2"],
                                   ["diffusion.prediction_type=v_prediction", "diffusion.snr_gamma=5",
                                    "diffusion.rescale_betas_zero_snr=true"],
                                   ["model.train_text_encoder=false", "train.lr_schedule=constant"]])
def test_short_run_end_to_end(tmp_path, tiny_vae_dir, data_dir, extra):
    cfg = _cfg(tmp_path, tiny_vae_dir, data_dir, *extra)
    result = train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "loss" in r and "epoch" in r]
    assert len(rows) == 12
    # Validation terms on fixed images, timesteps and noise, before and after training.
    val = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_mse" in r]
    assert [r["step"] for r in val] == [0, 60]
    assert val[1]["val_mse"] < 0.9 * val[0]["val_mse"], val
    if "val_vb" in val[0]:
        assert val[1]["val_vb"] < 0.5 * val[0]["val_vb"], val
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert result["steps"] == 60
    for f in ("config.yaml", "loss.png", "samples/step-60.png", "pipeline/model_index.json"):
        assert (cfg.run_dir / f).exists(), f
    pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    assert pipe.unet.config.out_channels == (8 if "diffusion.learned_variance=true" in extra else 4)
    images = pipe(["a red circle at the top left"], num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    if "diffusion.learned_variance=true" not in extra:
        # diffusers' own pipeline loads the exported folder and draws the same image.
        sd = StableDiffusionPipeline.from_pretrained(cfg.run_dir / "pipeline")
        sd.set_progress_bar_config(disable=True)
        theirs = sd(["a red circle at the top left"], num_inference_steps=3, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_allclose(theirs, images, atol=1e-4)
    assert not list((cfg.run_dir / "pipeline").rglob("*.bin"))
    assert json.loads((cfg.run_dir / "pipeline" / "model_index.json").read_text())["_class_name"] != "LDMPipeline"
    recorded = json.loads((cfg.run_dir / "pipeline" / "sampling.json").read_text())  # ldm.generate's defaults
    assert recorded == {"scheduler": cfg.sample.scheduler, "num_inference_steps": cfg.sample.num_inference_steps,
                        "guidance_scale": cfg.sample.guidance_scale, "height": 32, "width": 32,
                        "prompts": cfg.sample.prompts}  # the grid's: the page's first prompt


def _cache_folders(root):
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_latent_cache_reused_and_rebuilt(tmp_path, tiny_vae_dir, data_dir):
    cfg = _cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=1", "sample.seeds=[0]", "train.overwrite=true")
    train(cfg)
    first = _cache_folders(tmp_path / "cache")
    assert len(first) == 2  # the training images and the validation images
    train(cfg)  # same VAE, data and transform: the cache is reused
    assert _cache_folders(tmp_path / "cache") == first
    train(_cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=1", "sample.seeds=[0]", "train.overwrite=true", "data.center_crop=false"))
    second = _cache_folders(tmp_path / "cache")
    assert len(second) == 4 and first < second
    # A decoder-only change (as decoder-only fine-tuning makes) keeps the cached latents: encoding is unchanged.
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.01
    decoder_tuned = tmp_path / "vae-decoder"
    vae.save_pretrained(decoder_tuned, safe_serialization=True)
    train(_cfg(tmp_path, decoder_tuned, data_dir, "train.max_steps=1", "sample.seeds=[0]", "train.overwrite=true"))
    assert _cache_folders(tmp_path / "cache") == second
    # An encoder change makes new caches rather than reusing stale latents.
    with torch.no_grad():
        vae.encoder.conv_in.bias += 0.01
    encoder_changed = tmp_path / "vae-encoder"
    vae.save_pretrained(encoder_changed, safe_serialization=True)
    train(_cfg(tmp_path, encoder_changed, data_dir, "train.max_steps=1", "sample.seeds=[0]", "train.overwrite=true"))
    assert len(_cache_folders(tmp_path / "cache")) == 6
    # The cached arrays are memory-mapped .npy files holding the posterior mean and std.
    folder = tmp_path / "cache" / sorted(first)[0]
    assert {"mean_0.npy", "std_0.npy", "meta.json"} <= {p.name for p in folder.iterdir()}


def test_bad_inputs_raise(tmp_path, tiny_vae_dir, data_dir):
    with pytest.raises(ValueError, match="neither a local path nor a Hub dataset"):
        train(_cfg(tmp_path, tiny_vae_dir, tmp_path / "missing"))
    with pytest.raises(ValueError, match="no group has a full batch"):
        train(_cfg(tmp_path, tiny_vae_dir, data_dir, "train.batch_size=512"))
    with pytest.raises(ValueError, match="train.lr_schedule"):
        train(_cfg(tmp_path, tiny_vae_dir, data_dir, "train.lr_schedule=linear"))
    with pytest.raises(ValueError, match="sample.scheduler"):
        train(_cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=1", "sample.scheduler=euler"))
    # Checked before any data is read or model built: the data source does not even exist here.
    for bad, key in [("train.learning_rate=nan", "train.learning_rate"), ("train.learning_rate=-1", "train.learning_rate"),
                     ("train.max_steps=0", "train.max_steps"), ("train.log_every=0", "train.log_every"),
                     ("diffusion.num_train_timesteps=1", "diffusion.num_train_timesteps"),
                     ("train.seed=-1", "train.seed"), ("data.validation_fraction=1.5", "data.validation_fraction"),
                     ("sample.num_inference_steps=0", "sample.num_inference_steps"),
                     ("sample.guidance_scale=inf", "sample.guidance_scale"), ("sample.seeds=[]", "sample.seeds")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            train(_cfg(tmp_path, tiny_vae_dir, tmp_path / "missing", bad))

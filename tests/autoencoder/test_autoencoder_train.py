"""Short CPU runs of the autoencoder trainer: reconstruction error falls, the discriminator switches on
at disc_start, decoder-only fine-tuning leaves the encoder bit-identical."""

import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder.config import AutoencoderConfig
from autoencoder.train import train
from ldm.data.builtin import generate_shapes
from ldm.engine.config import load_config
from ldm.engine.records import read_metrics

TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=8", "model.latent_channels=4",
        "train.batch_size=8", "train.warmup_steps=2", "train.scale_num_images=16", "train.learning_rate=0.003"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_images=48, seed=0)


def _cfg(tmp_path, data_dir, *extra):
    return load_config(AutoencoderConfig, None, [f"output_dir={tmp_path}", "name=ae",
                                                 f"data.datasets=[{data_dir}]", *TINY, *extra])


def test_reconstruction_error_falls(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "train.max_steps=40", "train.log_every=5")
    result = train(cfg)
    rec = [r["rec"] for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "rec" in r]
    assert len(rec) == 8 and rec[-1] < 0.6 * rec[0], rec
    vae = AutoencoderKL.from_pretrained(cfg.run_dir / "vae")
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert (cfg.run_dir / "reconstructions.png").exists()
    # The measured scale gives unit-variance latents on the data (measured on 16 images, checked on 48).
    from autoencoder.data import image_datasets
    x = torch.stack([item["pixel_values"] for item in image_datasets(cfg.data, "train")])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1)))
    assert 0.85 < float(z.std() * vae.config.scaling_factor) < 1.15


def test_perceptual_term_without_weights_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(ValueError, match="lpips_path"):
        train(_cfg(tmp_path, data_dir, "train.max_steps=1", "train.perceptual_weight=0.5"))


def test_discriminator_switches_on_at_disc_start(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, "train.max_steps=6", "train.log_every=1", "train.disc_weight=0.5",
               "train.disc_start=3", "train.disc_channels=8", "train.disc_layers=2")
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "rec" in r]
    assert [("d_loss" in r) for r in rows] == [False, False, False, True, True, True]
    assert all(r["d_weight"] > 0 for r in rows[3:])
    with pytest.raises(ValueError, match="disc_loss"):
        train(_cfg(tmp_path, data_dir, "train.max_steps=1", "train.disc_weight=0.5", "train.disc_loss=wgan"))


def test_decoder_only_fine_tuning_keeps_encoder_bit_identical(tmp_path, data_dir):
    torch.manual_seed(0)
    base = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         layers_per_block=1, norm_num_groups=8, sample_size=32)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg = _cfg(tmp_path, data_dir, "train.max_steps=5", f"model.pretrained={tmp_path / 'base'}",
               "model.train_part=decoder")
    train(cfg)
    tuned = AutoencoderKL.from_pretrained(cfg.run_dir / "vae")
    before, after = base.state_dict(), tuned.state_dict()
    enc = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in before if k.startswith("decoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    with pytest.raises(ValueError, match="needs model.pretrained"):
        train(_cfg(tmp_path, data_dir, "train.max_steps=1", "model.train_part=decoder"))


def test_ema_weights_are_exported_and_shift_is_measured(tmp_path, data_dir):
    plain = _cfg(tmp_path, data_dir, "train.max_steps=6", "name=plain")
    train(plain)
    ema = _cfg(tmp_path, data_dir, "train.max_steps=6", "name=ema", "train.ema_decay=0.9", "train.measure_shift=true")
    result = train(ema)
    a = AutoencoderKL.from_pretrained(plain.run_dir / "vae").state_dict()
    b = AutoencoderKL.from_pretrained(ema.run_dir / "vae")
    # Same seed, same raw trajectory: the EMA export must differ from the raw final weights.
    assert any(not torch.equal(a[k], v) for k, v in b.state_dict().items())
    assert b.config.shift_factor == pytest.approx(result["shift_factor"]) and result["shift_factor"] is not None
    assert AutoencoderKL.from_pretrained(plain.run_dir / "vae").config.shift_factor is None


def test_resume_reaches_the_uninterrupted_weights(tmp_path, data_dir):
    """Stopped after step 4 (mid-epoch: 48 images in batches of 8 make 6 per epoch) with the GAN and EMA on,
    resumed from that checkpoint: the exported VAE is bit-identical to an uninterrupted run's."""
    import shutil

    from safetensors.torch import load_file

    from ldm.engine.checkpoint import list_checkpoints

    extra = ["train.max_steps=8", "train.checkpoint_every=4", "train.disc_weight=0.5", "train.disc_start=2",
             "train.ema_decay=0.9", "train.tensorboard=false", "train.disc_channels=8", "train.disc_layers=2"]
    full = _cfg(tmp_path / "full", data_dir, *extra)
    train(full)
    assert [p.name for p in list_checkpoints(full.run_dir / "checkpoints")] == ["step-4", "step-8"]
    resumed = _cfg(tmp_path / "resumed", data_dir, *extra, f"train.resume={full.run_dir / 'checkpoints' / 'step-4'}")
    train(resumed)
    a = load_file(full.run_dir / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed.run_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(full.run_dir / "checkpoints")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_cfg(tmp_path / "x", data_dir, *extra, f"train.resume={full.run_dir / 'checkpoints' / 'step-4'}"))

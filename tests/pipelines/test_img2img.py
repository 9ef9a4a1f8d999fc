"""Image-to-image and inpainting with a text-to-image model: diffusers' img2img pipeline draws our images from
our folder; strength 0 gives the image back through the VAE; inpainting keeps the unmasked region (exactly in
latents, and in pixels with keep_unmasked); determinism, learned variance, pixel space, bad inputs."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image
from tiny_models import make_pipe

from pipelines import LDMImg2ImgPipeline, LDMInpaintPipeline

PROMPT = "a red circle"

pytestmark = pytest.mark.usefixtures("one_thread")


def image(seed=0, size=16):
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((size, size, 3)) * 255).astype(np.uint8), "RGB")


def half_mask(size=16):
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2:] = 255  # right half: draw anew
    return Image.fromarray(m, "L")


def as_float(img):
    return np.asarray(img, np.float32) / 255.0


@pytest.fixture
def img2img(tokenizer_dir):  # noqa: F811
    return LDMImg2ImgPipeline.from_pipe(make_pipe(tokenizer_dir))


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "np")
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_from_pipe_shares_the_components(tokenizer_dir):  # noqa: F811
    base = make_pipe(tokenizer_dir)
    for cls in (LDMImg2ImgPipeline, LDMInpaintPipeline):
        p = cls.from_pipe(base)
        assert p.unet is base.unet and p.vae is base.vae and p.text_encoder is base.text_encoder


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_diffusers_img2img_draws_our_images(tokenizer_dir, tmp_path, scheduler_cls):  # noqa: F811
    pipe = make_pipe(tokenizer_dir)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "p")
    ours = LDMImg2ImgPipeline.from_pretrained(tmp_path / "p")
    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "p")
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    kw = {"image": image(), "strength": 0.6, "guidance_scale": 3.0, "num_inference_steps": 5,
          "negative_prompt": "blue", "num_images_per_prompt": 2}
    a = run(ours, **kw)
    b = theirs(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert a.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_strength_zero_returns_the_image_through_the_vae(img2img):
    x = image()
    out = run(img2img, image=x, strength=0.0)
    t = torch.from_numpy(as_float(x)).permute(2, 0, 1)[None] * 2 - 1
    z = img2img.vae.encode(t).latent_dist.sample(torch.Generator().manual_seed(0))
    round_trip = (img2img.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(out, round_trip, atol=1e-5)
    assert not np.allclose(run(img2img, image=x, strength=0.5), out, atol=1e-3)  # some strength changes it


def test_img2img_is_deterministic_with_learned_variance_and_accepts_a_lora_scale(tokenizer_dir):  # noqa: F811
    sched = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range", clip_sample=False)
    pipe = LDMImg2ImgPipeline.from_pipe(make_pipe(tokenizer_dir, unet_out_channels=8, scheduler=sched))
    a = run(pipe, image=image(), strength=0.7, guidance_scale=2.0)
    b = run(pipe, image=image(), strength=0.7, guidance_scale=2.0, cross_attention_kwargs={"scale": 1.0})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(pipe, seed=1, image=image(), strength=0.7, guidance_scale=2.0))
    assert np.isfinite(a).all()


def test_inpainting_keeps_the_unmasked_region(tokenizer_dir):  # noqa: F811
    pipe = LDMInpaintPipeline.from_pipe(make_pipe(tokenizer_dir))
    x, mask = image(), half_mask()
    out = run(pipe, image=x, mask_image=mask, guidance_scale=2.0)
    np.testing.assert_array_equal(out[0, :, :8], as_float(x)[:, :8])  # pasted back exactly
    assert np.abs(out[0, :, 8:] - as_float(x)[:, 8:]).mean() > 0.05  # the masked half is drawn anew
    np.testing.assert_array_equal(out, run(pipe, image=x, mask_image=mask, guidance_scale=2.0))
    # in latents the known half is the image's own latents after the last step, with or without pasting
    lat = run(pipe, image=x, mask_image=mask, output_type="latent", strength=0.8)
    t = torch.from_numpy(as_float(x)).permute(2, 0, 1)[None] * 2 - 1
    z = pipe.vae.encode(t).latent_dist.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(lat[..., :4], z[..., :4])
    assert (lat[..., 4:] - z[..., 4:]).abs().mean() > 1e-2
    raw = run(pipe, image=x, mask_image=mask, keep_unmasked=False)
    assert np.abs(raw[0, :, :8] - as_float(x)[:, :8]).max() > 0  # without pasting: the VAE's round trip


def test_inpainting_in_pixel_space(tokenizer_dir):  # noqa: F811
    base = make_pipe(tokenizer_dir)
    pixel = LDMInpaintPipeline(vae=None, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                               unet=_pixel_unet(), scheduler=base.scheduler)
    pixel.set_progress_bar_config(disable=True)
    x = image(size=8)
    lat = run(pixel, image=x, mask_image=half_mask(8), output_type="latent")
    torch.testing.assert_close(lat[..., :4], torch.from_numpy(as_float(x)).permute(2, 0, 1)[None, :, :, :4] * 2 - 1)


def _pixel_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16)


@pytest.mark.parametrize("kwargs, message", [
    ({"image": image().convert("RGBA")}, "mode 'RGBA'"),
    ({"image": np.full((16, 16, 3), 2.0, np.float32)}, r"must lie in \[0, 1\], got values in \[2, 2\]"),
    ({"image": torch.zeros(1, 3, 15, 16)}, "multiple of 2"),
    ({"image": [image(0), image(1), image(2)]}, "holds 3 images; give 1 or one per generated image"),
    ({"image": "x.png"}, "must be a PIL image, a list of them"),
    ({"image": image(), "strength": 1.5}, r"strength must be a number in \[0, 1\]"),
    ({"image": image(), "mask_image": half_mask(8)}, "mask_image size 8x8 must equal the image's 16x16"),
    ({"image": image(), "mask_image": image()}, "mask_image must be a PIL image of mode L or 1"),
])
def test_bad_inputs_are_named(tokenizer_dir, kwargs, message):  # noqa: F811
    pipe = LDMInpaintPipeline.from_pipe(make_pipe(tokenizer_dir))
    kwargs.setdefault("mask_image", half_mask())
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


def test_generate_cli_draws_from_an_image_and_a_mask(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    from ldm.generate import main

    make_pipe(tokenizer_dir).save_pretrained(tmp_path / "p")
    image().save(tmp_path / "in.png")
    half_mask().save(tmp_path / "mask.png")
    common = ["--pipeline", str(tmp_path / "p"), PROMPT, "--num-images", "1", "--steps", "3", "--image",
              str(tmp_path / "in.png")]
    main([*common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "inpaint.png")])
    out = as_float(Image.open(tmp_path / "inpaint-0.png"))
    np.testing.assert_array_equal(out[:, :8], as_float(image())[:, :8])
    main([*common, "--strength", "0.5", "--out", str(tmp_path / "i2i.png")])
    assert Image.open(tmp_path / "i2i-0.png").size == (16, 16)
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path / "p"), PROMPT, "--mask", str(tmp_path / "mask.png")])
    assert "--mask needs --image" in capsys.readouterr().err

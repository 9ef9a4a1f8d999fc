"""The super-resolution stage's pipeline: interop with diffusers' StableDiffusionUpscalePipeline both ways, the
latent-space reparametrisation it needs, pixel-space stages, and input errors. Tiny components, built here."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from tiny_models import get_dummy_components

from pipelines import SuperResolutionPipeline, low_res_scheduler, rescale_latent_space

PROMPT = "a red circle"
pytestmark = pytest.mark.usefixtures("one_thread")


def sr_components(tokenizer_dir, scaling_factor=0.08333, vae=True, out_channels=4, scheduler=None):
    comp = get_dummy_components(tokenizer_dir)
    torch.manual_seed(3)
    latent = 4 if vae else 3
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=latent + 3, out_channels=out_channels if vae else 3 * out_channels // 4,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16, num_class_embeds=1000)
    comp["vae"].register_to_config(scaling_factor=scaling_factor)
    return {"vae": comp["vae"] if vae else None, "text_encoder": comp["text_encoder"], "tokenizer": comp["tokenizer"],
            "unet": unet, "low_res_scheduler": low_res_scheduler(),
            "scheduler": scheduler or DDIMScheduler(num_train_timesteps=100, clip_sample=False,
                                                    prediction_type="v_prediction")}


def low_res_image(seed=0, size=8, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)  # [0, 1], as VaeImageProcessor takes tensors


def ours(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"image": low_res_image(), "num_inference_steps": 3, "guidance_scale": 2.0, "noise_level": 40,
              "generator": torch.Generator().manual_seed(0), "output_type": "np", **kwargs}
    return pipe(PROMPT, **kwargs).images


def theirs(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"image": low_res_image(), "num_inference_steps": 3, "guidance_scale": 2.0, "noise_level": 40,
              "generator": torch.Generator().manual_seed(0), "output_type": "np", **kwargs}
    return pipe(PROMPT, **kwargs).images


def test_rescaled_latent_space_encodes_and_decodes_the_same(tokenizer_dir):
    vae = get_dummy_components(tokenizer_dir, vae_shift_factor=0.1)["vae"]
    vae.register_to_config(scaling_factor=0.7)
    new = rescale_latent_space(vae)
    x = low_res_image(size=16) * 2 - 1
    with torch.no_grad():
        a, b = vae.encode(x).latent_dist, new.encode(x).latent_dist
        torch.testing.assert_close(0.08333 * b.mean, 0.7 * (a.mean - 0.1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(0.08333 * b.std, 0.7 * a.std, atol=1e-5, rtol=1e-5)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # scaled latents
        torch.testing.assert_close(new.decode(z / 0.08333).sample, vae.decode(z / 0.7 + 0.1).sample,
                                   atol=1e-5, rtol=1e-5)
    assert new.config.scaling_factor == 0.08333 and new.config.shift_factor is None


def test_our_latent_stage_loads_in_diffusers_upscaler_and_draws_the_same_image(tokenizer_dir, tmp_path):
    # Trained with the VAE's own factor (0.5 here, like the shipped VAE's 0.9864); exported with the latent space
    # rescaled to the upscaler's fixed 0.08333.
    comp = sr_components(tokenizer_dir, scaling_factor=0.5)
    reference = ours(SuperResolutionPipeline(**comp, max_noise_level=250))
    comp["vae"] = rescale_latent_space(comp["vae"])
    SuperResolutionPipeline(**comp, max_noise_level=250).save_pretrained(tmp_path)
    loaded = StableDiffusionUpscalePipeline.from_pretrained(tmp_path)
    assert loaded.vae.config.scaling_factor == 0.08333 and loaded.config.max_noise_level == 250
    got = theirs(loaded)
    assert got.shape == reference.shape == (1, 16, 16, 3)
    assert np.abs(got - reference).max() <= 2e-3
    assert reference.std() > 0.01  # an image, not a constant


def test_a_diffusers_upscaler_folder_loads_here_and_draws_the_same_image(tokenizer_dir, tmp_path):
    comp = sr_components(tokenizer_dir, scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False))
    theirs_pipe = StableDiffusionUpscalePipeline(**comp, max_noise_level=300)
    theirs_pipe.save_pretrained(tmp_path)
    pipe = SuperResolutionPipeline.from_pretrained(tmp_path)
    assert pipe.config.max_noise_level == 300 and isinstance(pipe.scheduler, DDPMScheduler)
    # DDPM draws noise at every step from the same generator: the whole chain of draws must line up.
    want, got = theirs(theirs_pipe), ours(pipe)
    assert np.abs(got - want).max() <= 2e-3


def test_pixel_space_stage_upsamples_its_condition_and_round_trips(tokenizer_dir, tmp_path):
    comp = sr_components(tokenizer_dir, vae=False)
    pipe = SuperResolutionPipeline(**comp, upscale_factor=2, max_noise_level=100)
    a = ours(pipe, image=low_res_image(size=4))
    assert a.shape == (1, 8, 8, 3)
    pipe.save_pretrained(tmp_path)
    loaded = SuperResolutionPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and loaded.upscale_factor == 2
    np.testing.assert_array_equal(ours(loaded, image=low_res_image(size=4)), a)


def test_noise_level_changes_the_result_and_is_checked(tokenizer_dir, caplog):
    pipe = SuperResolutionPipeline(**sr_components(tokenizer_dir), max_noise_level=100)
    a, b = ours(pipe, noise_level=0), ours(pipe, noise_level=90)
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="noise_level must be an int in \\[0, 999\\]"):
        ours(pipe, noise_level=1000)
    with caplog.at_level("WARNING"):
        ours(pipe, noise_level=500)
    assert "above this stage's max_noise_level=100" in caplog.text


def test_bad_images_are_refused_with_the_reason(tokenizer_dir):
    pipe = SuperResolutionPipeline(**sr_components(tokenizer_dir))
    with pytest.raises(ValueError, match="image \\(the low-resolution input\\) is required"):
        ours(pipe, image=None)
    with pytest.raises(ValueError, match="got 3 image\\(s\\) for 2 prompt\\(s\\)"):
        pipe([PROMPT, PROMPT], image=low_res_image(batch=3), num_inference_steps=1)
    with pytest.raises(ValueError, match="3 channels"):
        ours(pipe, image=torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="guidance_rescale must be a number in \\[0, 1\\]"):
        ours(pipe, guidance_rescale=2.0)


def test_several_prompts_and_images_per_prompt_each_get_their_own_noise(tokenizer_dir):
    pipe = SuperResolutionPipeline(**sr_components(tokenizer_dir))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    out = pipe([PROMPT, "a blue square"], image=low_res_image(batch=2), num_images_per_prompt=2, generator=gens,
               num_inference_steps=2, noise_level=50, output_type="np").images
    assert out.shape == (4, 16, 16, 3)
    # image i of the batch equals the same image drawn alone with its own generator
    alone = pipe("a blue square", image=low_res_image(batch=2)[1:], generator=torch.Generator().manual_seed(2),
                 num_inference_steps=2, noise_level=50, output_type="np").images
    assert np.abs(out[2] - alone[0]).max() < 1e-5


# ---------------------------------------------------------------------------------------------- cascades
def tiny_cascade(tokenizer_dir, stages=1):
    from pipelines import CascadePipeline, LDMPipeline

    base = LDMPipeline(**get_dummy_components(tokenizer_dir))  # 16 px
    srs = [SuperResolutionPipeline(**sr_components(tokenizer_dir), max_noise_level=200) for _ in range(stages)]
    cascade = CascadePipeline(base, srs, [{"noise_level": 50, "num_inference_steps": 2, "guidance_scale": 1.0}] * stages)
    cascade.set_progress_bar_config(disable=True)
    return cascade


def test_cascade_chains_stages_and_round_trips_through_one_folder(tokenizer_dir, tmp_path):
    from pipelines import CascadePipeline

    cascade = tiny_cascade(tokenizer_dir, stages=2)
    out = cascade([PROMPT, "a blue square"], negative_prompt="a red circle", num_inference_steps=2, guidance_scale=2.0,
                  num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np",
                  return_intermediates=True)
    assert out.images.shape == (4, 64, 64, 3)  # 16 px base, two ×2 stages
    assert [im.size for im in (out.intermediates[0][0], out.intermediates[1][0])] == [(16, 16), (32, 32)]
    cascade.save_pretrained(tmp_path / "cascade")
    loaded = CascadePipeline.from_pretrained(tmp_path / "cascade")
    loaded.set_progress_bar_config(disable=True)
    again = loaded([PROMPT, "a blue square"], negative_prompt="a red circle", num_inference_steps=2, guidance_scale=2.0,
                   num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.abs(again.images - out.images).max() < 1e-5, np.abs(again.images - out.images).max()
    assert loaded.stage_defaults[1]["noise_level"] == 50
    # one generator for the chain: the same seed gives the same images, another seed others
    other = loaded(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
    assert np.abs(other.images[0] - out.images[0]).max() > 1e-3


def test_cascade_noise_level_per_stage_and_its_errors(tokenizer_dir):
    cascade = tiny_cascade(tokenizer_dir, stages=2)
    kw = {"num_inference_steps": 1, "output_type": "np"}
    a = cascade(PROMPT, noise_level=[0, 0], generator=torch.Generator().manual_seed(0), **kw).images
    b = cascade(PROMPT, noise_level=[0, 300], generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="noise_level needs one value per stage \\(2\\), got 3"):
        cascade(PROMPT, noise_level=[0, 1, 2], **kw)
    with pytest.raises(ValueError, match="at least one super-resolution stage"):
        type(cascade)(cascade.base, [])


def test_generate_draws_with_a_cascade_folder(tokenizer_dir, tmp_path):
    from ldm.generate import main

    tiny_cascade(tokenizer_dir).save_pretrained(tmp_path / "cascade")
    main(["--pipeline", str(tmp_path / "cascade"), PROMPT, "--num-images", "2", "--steps", "2", "--noise-level", "30",
          "--out", str(tmp_path / "out.png")])
    import PIL.Image

    assert PIL.Image.open(tmp_path / "out-1.png").size == (32, 32)
    with pytest.raises(SystemExit):  # --noise-level on a plain pipeline folder is a user error
        cascade = tiny_cascade(tokenizer_dir)
        cascade.base.save_pretrained(tmp_path / "base")
        main(["--pipeline", str(tmp_path / "base"), PROMPT, "--steps", "1", "--noise-level", "3",
              "--out", str(tmp_path / "x.png")])


def test_cascade_folder_assembled_from_trained_stages(tokenizer_dir, tmp_path):
    from ldm.cascade import main
    from pipelines import CascadePipeline

    cascade = tiny_cascade(tokenizer_dir)
    cascade.base.save_pretrained(tmp_path / "base")
    cascade.stages[0].save_pretrained(tmp_path / "sr")
    main(["--base", str(tmp_path / "base"), "--stage", str(tmp_path / "sr"), "--stage", str(tmp_path / "sr"),
          "--noise-level", "10", "70", "--steps", "3", "--out", str(tmp_path / "c")])
    loaded = CascadePipeline.from_pretrained(tmp_path / "c")
    assert [d["noise_level"] for d in loaded.stage_defaults] == [10, 70]
    assert [d["num_inference_steps"] for d in loaded.stage_defaults] == [3, 3]
    with pytest.raises(SystemExit):  # a text-to-image folder given as a stage: a user error, not a traceback
        main(["--base", str(tmp_path / "base"), "--stage", str(tmp_path / "base"), "--out", str(tmp_path / "d")])

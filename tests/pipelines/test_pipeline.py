"""Tests for pipelines.LDMPipeline with tiny random components built in code (no Hub access)."""

import json
import math

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from tiny_models import get_dummy_components, make_pipe

from pipelines import LDMPipeline

PROMPT = "a red circle"
pytestmark = pytest.mark.usefixtures("one_thread")
@pytest.fixture
def pipe(tokenizer_dir):
    return make_pipe(tokenizer_dir)


def sample(pipe, seed=0, prompt=PROMPT, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(prompt, **kwargs).images


def test_tokenizer_knows_prompt_words(tokenizer_dir):
    tokenizer = get_dummy_components(tokenizer_dir)["tokenizer"]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT).input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]


@pytest.mark.parametrize(
    "output_type, check",
    [
        ("pil", lambda im: len(im) == 4 and all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in im)),
        ("np", lambda im: im.shape == (4, 16, 16, 3) and im.min() >= 0 and im.max() <= 1),
        ("pt", lambda im: im.shape == (4, 3, 16, 16) and im.min() >= 0 and im.max() <= 1),
        ("latent", lambda im: im.shape == (4, 4, 8, 8)),
    ],
    ids=["pil", "np", "pt", "latent"],
)
def test_output_shapes(pipe, output_type, check):
    images = sample(pipe, prompt=[PROMPT, "a circle"], num_images_per_prompt=2, output_type=output_type)
    assert check(images)


def test_explicit_size_and_tuple_output(pipe):
    out = pipe(PROMPT, num_inference_steps=2, height=12, width=20, output_type="np", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (1, 12, 20, 3)


def test_seeded_generator_is_deterministic(pipe):
    a, b, c = sample(pipe, seed=0), sample(pipe, seed=0), sample(pipe, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_generator_list_gives_one_stream_per_image(pipe):
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    batch = sample(pipe, num_images_per_prompt=2, generator=gens)
    np.testing.assert_allclose(batch[0], sample(pipe, seed=0)[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], sample(pipe, seed=1)[0], atol=1e-5)


def test_negative_prompt_changes_output(pipe):
    plain = sample(pipe)
    negative = sample(pipe, negative_prompt="red")
    np.testing.assert_array_equal(negative, sample(pipe, negative_prompt=["red"]))
    assert np.abs(plain - negative).max() > 1e-4


@pytest.mark.parametrize("guidance_scale, unet_batch", [(1.0, 2), (3.0, 4)])
def test_guidance_scale_one_skips_unconditional_pass(pipe, guidance_scale, unet_batch):
    batches = []
    pipe.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    images = sample(pipe, guidance_scale=guidance_scale, num_images_per_prompt=2)
    assert images.shape == (2, 16, 16, 3)
    assert batches == [unet_batch, unet_batch]


@pytest.mark.parametrize("shift_factor", [None, 0.25])
def test_decode_uses_scaling_and_shift(tokenizer_dir, shift_factor):
    pipe = make_pipe(tokenizer_dir, vae_shift_factor=shift_factor)
    latents = sample(pipe, output_type="latent")
    images = sample(pipe, output_type="pt")
    z = latents / pipe.vae.config.scaling_factor + (shift_factor or 0.0)
    expected = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected.detach(), atol=1e-5, rtol=0)


@pytest.fixture
def saved_folder(pipe, tmp_path):
    folder = tmp_path / "ldm"
    pipe.save_pretrained(folder)
    return folder


def test_save_load_round_trip(pipe, saved_folder):
    loaded = LDMPipeline.from_pretrained(saved_folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is LDMPipeline
    np.testing.assert_array_equal(sample(pipe, guidance_scale=3.0), sample(loaded, guidance_scale=3.0))


def test_saved_folder_layout(saved_folder):
    weights = [p.name for p in saved_folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt"}]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    index = json.loads((saved_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" != "LDMPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert not [p for p in saved_folder.iterdir() if p.name.startswith(".model_index")]  # no temp file left


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_draws_what_stable_diffusion_pipeline_draws(pipe, saved_folder, spacing):
    """Euler's initial noise scale follows the timesteps drawn under leading spacing (SDXL's scheduler)."""
    sd = StableDiffusionPipeline.from_pretrained(saved_folder)
    sd.set_progress_bar_config(disable=True)
    for p in (pipe, sd):
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config, timestep_spacing=spacing)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    sd_images = sd(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(sample(pipe, **kwargs), sd_images, atol=1e-5)


def test_generic_loader_avoids_diffusers_ldm_pipeline(saved_folder):
    loaded = diffusers.DiffusionPipeline.from_pretrained(saved_folder)
    assert not isinstance(loaded, diffusers.LDMPipeline)
    assert isinstance(loaded, StableDiffusionPipeline)


def test_stable_diffusion_pipeline_loads_and_matches(pipe, saved_folder):
    sd = StableDiffusionPipeline.from_pretrained(saved_folder)
    sd.set_progress_bar_config(disable=True)
    assert sd.safety_checker is None
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    sd_images = sd(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert sd_images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(sample(pipe, **kwargs), sd_images, atol=1e-5)


def test_v_prediction_at_zero_snr_with_guidance_rescale_matches_stable_diffusion(tokenizer_dir, tmp_path):
    """The built-in presets' sampling (v-prediction, zero terminal SNR, trailing spacing) and the guidance
    rescale of Lin et al. draw the same image in StableDiffusionPipeline as in ours."""
    scheduler = DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ours = make_pipe(tokenizer_dir, scheduler=scheduler)
    ours.save_pretrained(tmp_path)
    sd = StableDiffusionPipeline.from_pretrained(tmp_path)
    sd.set_progress_bar_config(disable=True)
    assert sd.scheduler.config.prediction_type == "v_prediction" and sd.scheduler.config.rescale_betas_zero_snr
    for rescale in (0.0, 0.7):
        kwargs = dict(num_inference_steps=4, guidance_scale=4.0, guidance_rescale=rescale, output_type="np")
        sd_images = sd(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        np.testing.assert_allclose(sample(ours, **kwargs), sd_images, atol=1e-5)
    plain, rescaled = (sample(ours, num_inference_steps=4, guidance_scale=4.0, guidance_rescale=r) for r in (0.0, 0.7))
    assert np.abs(plain - rescaled).max() > 1e-3  # the rescale does something


def test_loads_stable_diffusion_1x_folder(tokenizer_dir, tmp_path):
    sd = StableDiffusionPipeline(
        **get_dummy_components(tokenizer_dir), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    folder = tmp_path / "sd1x"
    sd.save_pretrained(folder)
    expected = sd(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    for claim_real_extras in (False, True):
        if claim_real_extras:
            # A real SD-1.x index names these classes; their folders are absent here, so loading one would fail.
            index_path = folder / "model_index.json"
            index = json.loads(index_path.read_text())
            index.update(
                safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                feature_extractor=["transformers", "CLIPImageProcessor"],
                image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                requires_safety_checker=True,
            )
            index_path.write_text(json.dumps(index))
        loaded = LDMPipeline.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is LDMPipeline
        assert not any(hasattr(loaded, name) for name in ("safety_checker", "feature_extractor", "image_encoder"))
        np.testing.assert_allclose(sample(loaded), expected, atol=1e-5)


def _record_step_channels(pipe):
    channels = []
    original_step = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        channels.append(model_output.shape[1])
        return original_step(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    return channels


def test_learned_variance_with_ddpm(tokenizer_dir):
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range", clip_sample=False)
    pipe = make_pipe(tokenizer_dir, unet_out_channels=8, scheduler=scheduler)
    channels = _record_step_channels(pipe)
    images = sample(pipe, guidance_scale=3.0, num_images_per_prompt=2)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert channels == [8, 8]  # DDPMScheduler receives [guided mean, variance] and splits it itself


@pytest.mark.parametrize("inherit_variance_type", [True, False])
def test_learned_variance_with_dpm_solver_drops_variance(tokenizer_dir, inherit_variance_type):
    ddpm = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range", clip_sample=False)
    pipe = make_pipe(tokenizer_dir, unet_out_channels=8, scheduler=ddpm)
    overrides = {} if inherit_variance_type else {"variance_type": None}
    # Inheriting variance_type="learned_range" makes DPMSolver slice model_output[:, :3]; the pipeline copes.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **overrides)
    images = sample(pipe, num_inference_steps=3, guidance_scale=3.0)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert pipe.scheduler.config.variance_type == ("learned_range" if inherit_variance_type else None)


def test_bad_unet_out_channels_raise(tokenizer_dir):
    with pytest.raises(ValueError, match="out_channels"):
        sample(make_pipe(tokenizer_dir, unet_out_channels=6))
    learned = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    with pytest.raises(ValueError, match="variance"):
        sample(make_pipe(tokenizer_dir, scheduler=learned))


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_scheduler_swap(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    a, b = sample(pipe, num_inference_steps=3), sample(pipe, num_inference_steps=3)
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": 3}, "prompt must be"),
        ({"prompt": []}, "non-empty list"),
        ({"prompt": [PROMPT, 1]}, "prompt must be"),
        ({"prompt": [PROMPT, PROMPT], "negative_prompt": ["x"]}, "one entry per prompt"),
        ({"negative_prompt": 5}, "negative_prompt must be"),
        ({"height": 15}, "height must be a positive multiple of 2, got 15"),
        ({"width": 0}, "width must be a positive multiple of 2, got 0"),
        ({"width": -4}, "width must be"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be an int in \[1, 100\], got 0"),
        ({"num_inference_steps": 101}, "got 101"),
        ({"guidance_scale": 0.5}, "guidance_scale must be a finite number >= 1.0"),
        ({"guidance_scale": "7"}, "guidance_scale"),
        ({"guidance_rescale": 1.5}, r"guidance_rescale must be a number in \[0, 1\].*got 1.5"),
        ({"guidance_rescale": -0.1}, "guidance_rescale must be"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive int, got 0"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"generator": [torch.Generator()] * 3, "num_images_per_prompt": 2}, "one torch.Generator per image"),
        ({"generator": 42}, "generator must be"),
    ],
)
def test_invalid_arguments_raise(pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_ldm_package_exports_our_pipeline():
    from ldm import LDMPipeline as Exported

    assert Exported is LDMPipeline and Exported is not getattr(diffusers, "LDMPipeline", None)


def test_vae_slicing_and_tiling_decode_large_images(pipe):
    kwargs = dict(height=96, width=96, num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    base = sample(pipe, **kwargs)
    pipe.enable_vae_slicing()  # one image at a time: the same numbers
    np.testing.assert_allclose(sample(pipe, **kwargs), base, atol=1e-5)
    pipe.disable_vae_slicing()
    calls = []
    original = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    pipe.enable_vae_tiling()  # 96 px decoded in blended 32 px tiles
    tiled = sample(pipe, **kwargs)
    assert calls and tiled.shape == base.shape == (2, 96, 96, 3)
    assert np.abs(tiled - base).mean() < 0.05
    pipe.disable_vae_tiling()


def test_respaced_learned_range_step_is_improved_diffusions_respaced_chain():
    """DDPMScheduler at n of T steps (what the pipeline samples a learned-variance model with) takes, at each
    kept timestep, improved-diffusion's respaced step: betas β'_i = 1 - ᾱ_{s_i} / ᾱ_{s_{i-1}} over the kept
    timesteps s, the learned range between log β'_i and log β̃'_i, the network called with the original t."""
    from ldm.diffusion.gaussian import GaussianDiffusion, make_betas

    T, n = 100, 10
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                          clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(n)
    kept = sorted(int(t) for t in sched.timesteps)
    ac = torch.cumprod(1 - make_betas("squaredcos_cap_v2", T).double(), 0)
    last, respaced = 1.0, []
    for s in kept:  # improved_diffusion/respace.py, written out
        respaced.append(1 - float(ac[s]) / last)
        last = float(ac[s])
    ours = GaussianDiffusion(torch.tensor(respaced, dtype=torch.float64), variance_type="learned_range")
    g = torch.Generator().manual_seed(0)
    for i in range(1, n):  # every step but the last, which adds no noise (see the next test)
        t = kept[i]
        xt = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g) * 2 - 1], 1)
        theirs = sched.step(out, t, xt, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
        mine = ours.p_sample(out.double(), xt.double(), torch.full((2,), i), noise.double())
        torch.testing.assert_close(theirs.double(), mine, rtol=1e-4, atol=1e-4)


def test_learned_variance_last_step_adds_no_noise(tokenizer_dir):
    """With respacing the chain ends at t > 0; the pipeline's last step returns the mean (x̂_0) there, as
    DDPM and improved-diffusion do, even where the network asks for the largest variance."""
    T = 100
    scheduler = DDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False,
                              timestep_spacing="trailing", steps_offset=1)
    pipe = make_pipe(tokenizer_dir, unet_out_channels=8, scheduler=scheduler)
    conv = pipe.unet.conv_out
    with torch.no_grad():  # variance channels = +1 everywhere: Σ = β'_t, the top of the learned range
        conv.weight[4:] = 0
        conv.bias[4:] = 1.0
    latents = sample(pipe, guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    init = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = T - 1  # one trailing step starts (and ends) at T - 1
    context = pipe._encode([PROMPT], 1, "cpu")
    eps = pipe.unet(init, t, encoder_hidden_states=context).sample[:, :4]
    ac = pipe.scheduler.alphas_cumprod[t]
    x0 = (init - (1 - ac).sqrt() * eps) / ac.sqrt()
    torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


def test_likelihood_bound_of_a_latent_pipeline(tokenizer_dir):
    from ldm.eval.likelihood import nll

    pipe = make_pipe(tokenizer_dir)
    full = nll(pipe, "shapes", num_images=2, stride=1)
    strided = nll(pipe, "shapes", num_images=2, stride=25)
    assert full["space"] == "latents" and full["network_passes_per_image"] == 100
    assert strided["network_passes_per_image"] == 25 + 3  # t < 25 exactly, then one t in 25-49, 50-74, 75-99
    for r in (full, strided):
        assert math.isfinite(r["nll_bpd"]) and r["nll_bpd"] > r["prior_bpd"] >= 0
    # An untrained network: the estimate is within a few standard errors of the full bound.
    assert abs(full["nll_bpd"] - strided["nll_bpd"]) < 0.5 * full["nll_bpd"]
    with pytest.raises(ValueError, match="nll-stride"):
        nll(pipe, "shapes", num_images=1, stride=0)

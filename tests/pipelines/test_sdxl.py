"""Stable Diffusion XL folders: recognised, encoded and drawn as diffusers' StableDiffusionXLPipeline does it, and
saved so that diffusers loads them as SDXL (tiny SDXL-architecture folders built in code)."""

import json

import numpy as np
import pytest
import torch
from tiny_models import sd_folder, sdxl_folder

from pipelines import LDMImg2ImgPipeline, LDMPipeline, LDMXLPipeline
from pipelines.families import family_of

CAPTIONS = ["a red circle at the top left", "a blue square at the center", "a green triangle"]
PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory, tiny_vae_dir):
    return sdxl_folder(tmp_path_factory.mktemp("sdxl"), tiny_vae_dir, CAPTIONS)


@pytest.fixture(scope="module")
def diffusers_xl(xl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(folder):
    pipe = LDMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe, **kwargs):
    args = {"prompt": [PROMPT, "a blue square at the center"], "num_inference_steps": 4, "guidance_scale": 5.0,
            "output_type": "np", **kwargs}
    args["generator"] = [torch.Generator().manual_seed(i) for i in range(len(args["prompt"]))]
    return pipe(**args).images


def test_an_sdxl_folder_is_recognised(xl_dir, tmp_path, tiny_vae_dir):
    assert family_of(xl_dir) == "sdxl"
    assert family_of(sd_folder(tmp_path / "sd", tiny_vae_dir, CAPTIONS)) == "sd"
    assert family_of(tmp_path / "missing") is None
    pipe = _ours(xl_dir)
    assert type(pipe) is LDMXLPipeline and pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None


def test_the_generic_classes_pick_the_family_and_the_others_say_so(xl_dir, tmp_path, tiny_vae_dir):
    from pipelines import LDMInpaintPipeline, LDMXLImg2ImgPipeline, LDMXLInpaintPipeline

    assert type(LDMImg2ImgPipeline.from_pretrained(xl_dir)) is LDMXLImg2ImgPipeline
    assert type(LDMInpaintPipeline.from_pipe(_ours(xl_dir))) is LDMXLInpaintPipeline
    with pytest.raises(ValueError, match="holds a sd model.*LDMPipeline"):
        LDMXLPipeline.from_pretrained(sd_folder(tmp_path / "sd", tiny_vae_dir, CAPTIONS))
    with pytest.raises(ValueError, match="holds a sdxl model and SuperResolutionPipeline draws sd models"):
        from pipelines.sr_pipeline import SuperResolutionPipeline

        SuperResolutionPipeline.from_pretrained(xl_dir)


@pytest.mark.parametrize("negative", [None, "a green triangle"])
def test_context_and_pooled_text_equal_diffusers_encode_prompt(xl_dir, diffusers_xl, negative):
    pipe = _ours(xl_dir)
    s = pipe._sampling([PROMPT], negative, 64, 64, num_images_per_prompt=2, guidance_scale=5.0,
                       conditions={"time_ids": [64, 64, 0, 0, 64, 64], "negative_time_ids": [64, 64, 0, 0, 64, 64]})
    cond = pipe._context(s, "cpu")
    context, negative_context, pooled, negative_pooled = diffusers_xl.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True, negative_prompt=negative)
    assert cond.context.shape == (4, 16, 64)  # negatives then prompts, 32 + 32 features
    torch.testing.assert_close(cond.context, torch.cat([negative_context, context]), rtol=0, atol=0)
    added = cond.unet_kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], torch.cat([negative_pooled, pooled]), rtol=0, atol=0)
    if negative is None:  # force_zeros_for_empty_prompt: zeros, not the empty prompt's encoding
        assert not negative_context.any() and not negative_pooled.any()


def test_time_ids_equal_diffusers(xl_dir, diffusers_xl):
    pipe = _ours(xl_dir)
    sizes = ((96, 80), (8, 16), (64, 64))
    expected = diffusers_xl._get_add_time_ids(*sizes, dtype=torch.float32, text_encoder_projection_dim=16)
    seen = {}
    real = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.setdefault("ids", kwargs["added_cond_kwargs"]["time_ids"])
        return real(*args, **kwargs)

    pipe.unet.forward = spy
    pipe(PROMPT, num_inference_steps=1, original_size=sizes[0], crops_coords_top_left=sizes[1],
         target_size=sizes[2], output_type="latent")
    assert seen["ids"].shape == (2, 6)  # negatives' and prompt's rows
    torch.testing.assert_close(seen["ids"], expected.repeat(2, 1))


@pytest.mark.parametrize("kwargs", [
    {},
    {"negative_prompt": ["a green triangle", ""]},
    {"original_size": (128, 96), "crops_coords_top_left": (16, 0), "target_size": (64, 64), "guidance_rescale": 0.5},
    # One image: with several, diffusers repeats [negative ids, prompt ids] per image, so its rows pair the
    # negative sizes with some prompts' contexts; ours give every negative row the negative sizes.
    {"negative_original_size": (32, 32), "negative_target_size": (64, 64), "prompt": [PROMPT]},
], ids=["zeros-for-empty", "negatives", "sizes-and-rescale", "negative-sizes"])
def test_draws_what_diffusers_draws(xl_dir, diffusers_xl, kwargs):
    ours, theirs = _draw(_ours(xl_dir), **kwargs), _draw(diffusers_xl, **kwargs)
    assert ours.shape == (len(kwargs.get("prompt", "ab")), 32, 32, 3)
    assert np.abs(ours - theirs).max() <= 2e-3


def test_the_crop_condition_changes_the_image(xl_dir):
    pipe = _ours(xl_dir)
    a, b = _draw(pipe), _draw(pipe, crops_coords_top_left=(32, 32))
    assert np.abs(a - b).max() > 1e-3


def test_saved_folder_loads_as_sdxl_in_diffusers(xl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = _ours(xl_dir)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert "safety_checker" not in index
    theirs = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(_draw(pipe) - _draw(theirs)).max() <= 2e-3
    assert type(_ours(tmp_path / "saved")) is LDMXLPipeline


def test_bad_size_conditions_are_refused(xl_dir):
    with pytest.raises(ValueError, match="pairs of ints"):
        _ours(xl_dir)(PROMPT, num_inference_steps=1, original_size=(64.5, 64))


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_image_to_image_and_inpainting_draw_what_diffusers_draws(xl_dir, task):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    from pipelines import LDMInpaintPipeline

    rng = np.random.default_rng(0)
    # One image per prompt: given one image for several, diffusers' SDXL inpainting encodes it once with the
    # first generator; ours (and both img2img pipelines) draw each image's posterior sample with its own.
    images = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    mask = np.zeros((32, 32), np.uint8)
    mask[16:, 8:24] = 255
    generic = {"img2img": LDMImg2ImgPipeline, "inpaint": LDMInpaintPipeline}[task]
    ours = generic.from_pipe(_ours(xl_dir))
    theirs = {"img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline}[task] \
        .from_pretrained(xl_dir, local_files_only=True)
    extra = {"mask_image": [Image.fromarray(mask)] * 2} if task == "inpaint" else {}
    draws = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"keep_unmasked": False} if pipe is ours and task == "inpaint" else {}
        draws.append(pipe([PROMPT, "a blue square at the center"], image=images, strength=0.6, num_inference_steps=5,
                          guidance_scale=5.0, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                          output_type="np", **extra, **kwargs).images)
    assert type(ours).__name__ == {"img2img": "LDMXLImg2ImgPipeline", "inpaint": "LDMXLInpaintPipeline"}[task]
    assert draws[0].shape == (2, 32, 32, 3)
    assert np.abs(draws[0] - draws[1]).max() <= 2e-3


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_every_sampler_draws_what_diffusers_draws(xl_dir, diffusers_xl, name):
    from ldm.diffusion.schedulers import sampling_scheduler

    ours = _ours(xl_dir)
    ours.scheduler = sampling_scheduler(ours.scheduler, name)
    kept, diffusers_xl.scheduler = diffusers_xl.scheduler, ours.scheduler
    try:
        assert np.abs(_draw(ours) - _draw(diffusers_xl)).max() <= 2e-3
    finally:
        diffusers_xl.scheduler = kept


def test_enable_fast_draws_the_eager_images(xl_dir):
    pipe = _ours(xl_dir)
    eager = _draw(pipe)
    fast = _draw(pipe.enable_fast(compile=None))  # fused projections; compiling is covered for LDMPipeline
    assert pipe._fused_qkv and np.abs(eager - fast).max() <= 2e-3


def test_lora_in_diffusers_sdxl_layout_loads_as_in_diffusers(xl_dir, diffusers_xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = _ours(xl_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder_2)
    for module in (pipe.unet, pipe.text_encoder_2):
        for name, p in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder_2)))
    ours = _ours(xl_dir)
    ours.load_lora_weights(tmp_path)
    diffusers_xl.load_lora_weights(tmp_path)
    assert any("lora_A" in name for name, _ in ours.text_encoder_2.named_parameters())
    try:
        with_lora = _draw(ours)
        assert np.abs(with_lora - _draw(diffusers_xl)).max() <= 2e-3
        assert np.abs(with_lora - _draw(_ours(xl_dir))).max() > 1e-3  # the adapters (both encoders') act
    finally:
        diffusers_xl.unload_lora_weights()


def test_generate_command_draws_an_sdxl_folder(xl_dir, tmp_path):
    from PIL import Image

    from ldm.generate import main

    main(["--pipeline", str(xl_dir), PROMPT, "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    main(["--pipeline", str(xl_dir), PROMPT, "--steps", "2", "--image", str(tmp_path / "in.png"), "--strength", "0.5",
          "--out", str(tmp_path / "i2i.png")])
    main(["--pipeline", str(xl_dir), PROMPT, "--steps", "2", "--image", str(tmp_path / "in.png"), "--mask",
          str(tmp_path / "mask.png"), "--out", str(tmp_path / "inpaint.png")])
    assert (tmp_path / "i2i.png").is_file() and (tmp_path / "inpaint.png").is_file()


def test_the_original_layout_names_sdxl_unet_modules(xl_dir):
    from pipelines.original_layout import original_unet_module

    config = _ours(xl_dir).unet.config
    assert original_unet_module("add_embedding.linear_1", config) == "label_emb.0.0"
    assert original_unet_module("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", config) == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert original_unet_module("up_blocks.1.resnets.0.conv1", config) == "output_blocks.2.0.in_layers.2"


def test_an_fp16_vae_that_asks_for_upcasting_decodes_in_fp32(xl_dir):
    pipe = _ours(xl_dir)
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    seen = []
    real = pipe.vae.decode

    def spy(latents, *args, **kwargs):
        seen.append((latents.dtype, pipe.vae.dtype))
        return real(latents, *args, **kwargs)

    pipe.vae.decode = spy
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        images = pipe._decode(latents, "np")
    assert seen == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16  # given back
    assert np.isfinite(images).all()


def test_an_sdxl_embedding_loads_into_both_encoders_as_in_diffusers(xl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    from ldm.generate import main
    from ldm.methods.textual_inversion import load_embedding

    torch.manual_seed(0)
    vectors = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}  # two vectors per encoder
    save_file(vectors, str(tmp_path / "shiny.safetensors"), metadata={"format": "pt"})
    ours = _ours(xl_dir)
    load_embedding(ours, tmp_path / "shiny.safetensors")  # called by the file's name, as AUTOMATIC1111 does
    theirs = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    state = load_file(tmp_path / "shiny.safetensors")
    theirs.load_textual_inversion(state["clip_l"], token="shiny", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token="shiny", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    theirs.set_progress_bar_config(disable=True)
    prompt = ["a shiny circle", "a red circle"]
    with_token = _draw(ours, prompt=prompt)
    assert np.abs(with_token - _draw(theirs, prompt=prompt)).max() <= 2e-3
    assert np.abs(with_token - _draw(_ours(xl_dir), prompt=prompt)).max() > 1e-3  # the vectors act
    main(["--pipeline", str(xl_dir), "a shiny circle", "--steps", "2", "--embedding", str(tmp_path / "shiny.safetensors"),
          "--out", str(tmp_path / "shiny.png")])
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "one.safetensors"))
    with pytest.raises(ValueError, match="one encoder's vectors, which LDMXLPipeline"):
        load_embedding(_ours(xl_dir), tmp_path / "one.safetensors")


def test_token_ids_encode_with_one_tensor_per_encoder_and_a_projection_last(xl_dir):
    from pipelines.sdxl import encode_token_ids

    pipe = _ours(xl_dir)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="got 1 token-id tensors for 2 text encoders"):
        encode_token_ids([pipe.text_encoder, pipe.text_encoder_2], [ids], "cpu")
    with pytest.raises(ValueError, match="last text encoder .* has no text_embeds"):
        encode_token_ids([pipe.text_encoder_2, pipe.text_encoder], [ids, ids], "cpu")

"""Single-file checkpoints of Stable Diffusion XL in SDXL's original (generative-models) layout, on tiny
SDXL-architecture folders built in code: diffusers' own converter reads what we write back to the same weights and
images, our loader rebuilds an LDMXLPipeline from the file alone, the keys are SDXL's (OpenCLIP names for the
second text encoder, its projection transposed), the schedule markers are there exactly when due, and training
starts from the file."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import sdxl_folder

from ldm.export import main as export_main
from pipelines import LDMPipeline, LDMXLPipeline, to_single_file
from pipelines.families import family_of
from pipelines.original_layout import XL_OPEN_CLIP_PREFIX, layout_state_dict
from pipelines.single_file import config_dir, materialize

CAPTIONS = ["a red circle at the top left", "a blue square at the center", "a green triangle"]
PROMPT = CAPTIONS[0]
# (prediction type, zero terminal SNR, force_zeros_for_empty_prompt). The second encoder is 48 wide, the first
# 32, as SDXL's differ (768, 1280): diffusers' pipeline loader tells the two apart by width.
VARIANTS = {"vpred-zsnr": ("v_prediction", True, True), "eps": ("epsilon", False, False)}
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(VARIANTS))
def xl(request, tmp_path_factory, tiny_vae_dir):
    prediction, zero_snr, zeros = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"xl-{request.param}")
    folder = sdxl_folder(root / "pipeline", tiny_vae_dir, CAPTIONS, prediction_type=prediction, zero_snr=zero_snr,
                         force_zeros_for_empty_prompt=zeros, width_2=48)
    file = to_single_file(LDMPipeline.from_pretrained(folder), root / "xl.safetensors")
    return {"folder": folder, "file": file, "variant": request.param}


def draw(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe([PROMPT], num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def assert_same_weights(a, b, models=MODELS, cast=None):
    for name in models:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            want = sa[k] if cast is None else sa[k].to(cast).float()
            assert torch.equal(want, sb[k].float() if cast else sb[k]), f"{name}.{k}"


def test_diffusers_reads_the_file_to_the_same_weights_and_images(xl):
    from diffusers import StableDiffusionXLPipeline

    ours = LDMPipeline.from_pretrained(xl["folder"])
    theirs = StableDiffusionXLPipeline.from_single_file(str(xl["file"]), config=str(config_dir(xl["file"])),
                                                        local_files_only=True)
    assert_same_weights(ours, theirs)
    assert dict(theirs.scheduler.config) == dict(ours.scheduler.config)
    assert theirs.config.force_zeros_for_empty_prompt == VARIANTS[xl["variant"]][2]
    diff = np.abs(draw(theirs) - draw(ours)).max()
    print(f"{xl['variant']}: diffusers from the file vs ours from the folder, max abs diff {diff:.2e}")
    assert diff <= 2e-3, diff


def test_our_loader_rebuilds_the_sdxl_pipeline_from_the_file_alone(xl, tmp_path):
    lone = tmp_path / "lone.safetensors"  # no config folder beside it: the metadata holds the configs
    shutil.copy(xl["file"], lone)
    assert family_of(lone) == "sdxl"
    ours = LDMPipeline.from_pretrained(xl["folder"])
    loaded = LDMPipeline.from_single_file(lone)
    assert type(loaded) is LDMXLPipeline
    assert_same_weights(ours, loaded)
    assert dict(loaded.scheduler.config) == dict(ours.scheduler.config)
    assert loaded.config.force_zeros_for_empty_prompt == ours.config.force_zeros_for_empty_prompt
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name).get_vocab() == getattr(ours, name).get_vocab()
    reference = draw(ours)
    diff = np.abs(draw(loaded) - reference).max()
    print(f"{xl['variant']}: LDMPipeline.from_single_file vs the folder, max abs diff {diff:.2e}")
    assert diff <= 2e-3, diff
    folder = materialize(lone, tmp_path / "materialized")
    assert family_of(folder) == "sdxl"
    assert np.abs(draw(LDMPipeline.from_pretrained(folder)) - reference).max() <= 2e-3
    from ldm.generate import main

    main(["--pipeline", str(lone), PROMPT, "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file()


def test_keys_are_sdxl_originals_with_the_schedule_markers_due(xl):
    with safe_open(str(xl["file"]), framework="pt") as f:
        keys = set(f.keys())
    for key in ["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                "first_stage_model.decoder.conv_out.weight",
                "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.bias",
                "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.bias"]:
        assert key in keys, key
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                XL_OPEN_CLIP_PREFIX)
    markers = {k for k in keys if not k.startswith(prefixes)}
    assert markers == ({"v_pred", "ztsnr"} if xl["variant"] == "vpred-zsnr" else set())
    state = load_file(xl["file"])
    assert all(state[k].numel() == 0 for k in markers)
    assert not [k for k in keys if "self_attn" in k and k.startswith(XL_OPEN_CLIP_PREFIX)]
    assert not [k for k in keys if k.startswith("cond_stage_model.")]


def test_the_second_encoder_is_in_openclip_form_as_diffusers_converts_it(xl):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    te_2 = LDMPipeline.from_pretrained(xl["folder"]).text_encoder_2
    state = load_file(xl["file"])
    projection = state[XL_OPEN_CLIP_PREFIX + "text_projection"]
    assert projection.shape == (48, 16)  # (width, projection): x @ text_projection
    assert torch.equal(projection, te_2.text_projection.weight.T)
    attention = te_2.text_model.encoder.layers[1].self_attn
    assert torch.equal(state[XL_OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
    converted = convert_open_clip_checkpoint(te_2, state, prefix=XL_OPEN_CLIP_PREFIX)
    ours = te_2.state_dict()
    assert converted.keys() == ours.keys()
    for k, v in converted.items():
        assert torch.equal(v, ours[k]), k


def test_equal_encoder_widths_read_back_right(tmp_path, tiny_vae_dir):
    """Both encoders 32 wide: diffusers' pipeline loader would read the first encoder's weights into the second
    (it tells them apart by width); ours reads the second from its own OpenCLIP weights."""
    folder = sdxl_folder(tmp_path / "pipeline", tiny_vae_dir, CAPTIONS)
    ours = LDMPipeline.from_pretrained(folder)
    file = to_single_file(ours, tmp_path / "xl.safetensors")
    loaded = LDMPipeline.from_single_file(file)
    assert_same_weights(ours, loaded)
    assert np.abs(draw(loaded) - draw(ours)).max() <= 2e-3


def test_fp16_export_and_the_cli(xl, tmp_path, capsys):
    out = tmp_path / "cli" / "xl16.safetensors"
    export_main(["single-file", "--pipeline", str(xl["folder"]), "--out", str(out), "--dtype", "fp16"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "StableDiffusionXLPipeline.from_single_file" in printed
    assert all(v.dtype == torch.float16 for v in load_file(out).values())
    index = json.loads((config_dir(out) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"][1] == "CLIPTokenizer" and "safety_checker" not in index
    assert sorted(p.name for p in out.parent.iterdir()) == ["xl16.config", "xl16.safetensors"]
    from diffusers import StableDiffusionXLPipeline

    ours = LDMPipeline.from_pretrained(xl["folder"])
    theirs = StableDiffusionXLPipeline.from_single_file(str(out), config=str(config_dir(out)), local_files_only=True,
                                                        torch_dtype=torch.float16)
    loaded = LDMPipeline.from_single_file(out, torch_dtype=torch.float16)
    assert type(loaded) is LDMXLPipeline
    for pipe in (theirs, loaded):
        assert pipe.unet.dtype == pipe.text_encoder_2.dtype == pipe.vae.dtype == torch.float16
        assert_same_weights(ours, pipe, cast=torch.float16)


def test_a_file_from_elsewhere_reads_with_an_sdxl_folder_and_not_an_sd_one(xl, tmp_path, tiny_vae_dir):
    from tiny_models import sd_folder

    bare = tmp_path / "bare.safetensors"  # the weights without metadata, as files made elsewhere are
    save_file(load_file(xl["file"]), bare)
    assert family_of(bare) == "sdxl"
    ours = LDMPipeline.from_pretrained(xl["folder"])
    assert_same_weights(ours, LDMPipeline.from_single_file(bare, config=xl["folder"]))  # a full folder serves
    from pipelines import LDMImg2ImgPipeline, LDMXLImg2ImgPipeline

    assert type(LDMImg2ImgPipeline.from_single_file(bare, config=xl["folder"])) is LDMXLImg2ImgPipeline
    with pytest.raises(ValueError, match="holds a sdxl model and its configs .* a sd one"):
        LDMPipeline.from_single_file(bare, config=sd_folder(tmp_path / "sd", tiny_vae_dir, CAPTIONS))
    with pytest.raises(ValueError, match="holds a sdxl model and SuperResolutionPipeline"):
        from pipelines import SuperResolutionPipeline

        SuperResolutionPipeline.from_single_file(bare, config=xl["folder"])
    # An SDXL refiner's file (U-Net and one OpenCLIP encoder, conditioner.embedders.0.model.) is named, not misread
    weights = load_file(xl["file"])
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in weights.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, tmp_path / "refiner.safetensors")
    assert family_of(tmp_path / "refiner.safetensors") is None
    with pytest.raises(ValueError, match="an SDXL refiner .* is not supported"):
        LDMPipeline.from_single_file(tmp_path / "refiner.safetensors", config=xl["folder"])


def test_training_starts_from_an_sdxl_file(xl, tmp_path, tiny_cfg):
    from ldm.diffusion.schedulers import load_noise_scheduler
    from ldm.models.components import build_components
    from ldm.trainer.sdxl import XLTextToImage
    from ldm.trainer.stages import stage_class

    lone = tmp_path / "base.safetensors"
    shutil.copy(xl["file"], lone)  # the file alone
    cfg = tiny_cfg(f"model.pretrained={lone}")
    assert stage_class(cfg) is XLTextToImage
    components = build_components(cfg, CAPTIONS)
    base = LDMPipeline.from_pretrained(xl["folder"])
    assert_same_weights(base, components)
    assert components.force_zeros == base.config.force_zeros_for_empty_prompt
    # the training schedule the folder gives (its prediction type and zero-SNR setting included)
    assert dict(components.scheduler.config) == dict(load_noise_scheduler(xl["folder"] / "scheduler").config)
    # and trains from it: two steps, exported as an SDXL folder whose U-Net moved off the file's
    from ldm.trainer.train import train

    cfg = tiny_cfg(f"model.pretrained={lone}", "train.max_steps=2", "train.batch_size=4",
                   "data.validation_num_images=4", "train.learning_rate=0.001")
    train(cfg)
    out = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    assert isinstance(out, LDMXLPipeline)
    moved = [not torch.equal(a, b) for a, b in zip(out.unet.state_dict().values(), base.unet.state_dict().values())]
    assert any(moved)
    assert components.scheduler.config.prediction_type == VARIANTS[xl["variant"]][0]
    made = list((tmp_path / "single-file").iterdir())
    assert len(made) == 1 and made[0].name.startswith("base-")


def test_sdxl_base_architecture_maps_to_its_original_names():
    """SDXL base's configs (built on the meta device) give SDXL base 1.0's key names and counts; diffusers
    infers the type xl_base from them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          max_position_embeddings=77))
        te_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))
    state = layout_state_dict(unet, vae, te, te_2)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.", XL_OPEN_CLIP_PREFIX)
    # SDXL base 1.0's file has these counts but for two entries transformers' models do not hold: CLIP-L's
    # position_ids buffer and OpenCLIP's logit_scale (neither is read by diffusers)
    assert {p: sum(k.startswith(p) for k in state) for p in prefixes} == dict(zip(prefixes, (1680, 248, 196, 389)))
    assert infer_diffusers_model_type(state) == "xl_base"
    u = "model.diffusion_model."
    for key in ["input_blocks.3.0.op.weight", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", "input_blocks.4.0.skip_connection.weight",
                "middle_block.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.out_layers.3.weight", "label_emb.0.2.weight"]:
        assert u + key in state, key
    assert not [k for k in state if k.startswith((u + "input_blocks.9.", u + "input_blocks.1.1.", u + "output_blocks.8.1."))]
    assert state[u + "input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # linear projections
    assert state[XL_OPEN_CLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert state[XL_OPEN_CLIP_PREFIX + "text_projection"].shape == (1280, 1280)


def test_what_the_sdxl_layout_cannot_hold_is_refused_by_name(xl, tmp_path):
    pipe = LDMPipeline.from_pretrained(xl["folder"])
    from pipelines.original_layout import layout_state_dict as layout

    with pytest.raises(ValueError, match="addition_embed_type='text_time' and the pipeline has no second"):
        layout(pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(ValueError, match="second text encoder is a CLIPTextModel"):
        layout(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder)
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="no text_encoder"):
        to_single_file(pipe, tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()

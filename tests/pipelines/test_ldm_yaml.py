"""A Stable Diffusion 1.x/2.x single file gets the original config AUTOMATIC1111 reads beside it (with
``parameterization: v`` for v-prediction): diffusers' own reader of such configs builds the same U-Net and VAE from
it, weights and all. The export command writes Stability's modelspec entries into the file."""

import logging

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from ldm.models.text import build_text_encoder, build_tokenizer
from pipelines import LDMPipeline
from pipelines.single_file import to_single_file


def _pipe(prediction_type: str, linear: bool, groups: int = 32):
    torch.manual_seed(0)
    tok = build_tokenizer(["a red circle", "a blue square"], vocab_size=600, max_length=16)
    te = build_text_encoder(tok, 32, 1, 2, 64)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=groups,
                        sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                                attention_head_dim=[1, 2] if linear else 2, norm_num_groups=groups,
                                use_linear_projection=linear)
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type, clip_sample=False)
    return LDMPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched)


@pytest.mark.parametrize("prediction_type, linear", [("v_prediction", False), ("epsilon", True)])
def test_the_original_config_beside_a_single_file_rebuilds_the_model_in_diffusers(tmp_path, prediction_type, linear):
    pipe = _pipe(prediction_type, linear)
    out = to_single_file(pipe, tmp_path / "model.safetensors")
    config = yaml.safe_load((tmp_path / "model.yaml").read_text())
    params = config["model"]["params"]
    assert params.get("parameterization") == ("v" if prediction_type == "v_prediction" else None)
    assert (params["timesteps"], params["linear_start"], params["linear_end"]) == (100, 0.00085, 0.012)
    theirs = StableDiffusionPipeline.from_single_file(str(out), original_config=str(tmp_path / "model.yaml"),
                                                      text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                                      safety_checker=None, local_files_only=True)
    for name in ("unet", "vae"):
        a, b = getattr(pipe, name), getattr(theirs, name)
        different = {k for k in a.config if not k.startswith("_") and k in b.config and a.config[k] != b.config[k]}
        assert different <= {"sample_size"}, different  # diffusers guesses the size from the file
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_the_original_code_cannot_build_gets_no_config_and_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        to_single_file(_pipe("v_prediction", False, groups=8), tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.yaml").exists() and "normalises in 32 groups" in caplog.text


def test_the_export_command_writes_modelspec_entries(tmp_path):
    from ldm.export import main

    _pipe("v_prediction", False).save_pretrained(tmp_path / "pipeline")
    main(["single-file", "--pipeline", str(tmp_path / "pipeline"), "--out", str(tmp_path / "mine.safetensors")])
    with safe_open(str(tmp_path / "mine.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "mine" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "16x16" and (tmp_path / "mine.yaml").is_file()

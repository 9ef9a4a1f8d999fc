"""Single files that come without their configs (as downloaded from model sites) are recognised from their keys
and shapes, Stable Diffusion 1.x, 2.x and XL base alike, and load with every weight in place; CLIP's tokenizer,
built from the merges shipped with the package, gives CLIP's own token ids."""

import logging

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from ldm.models.text import build_text_encoder, build_tokenizer
from pipelines import LDMPipeline
from pipelines.architectures import write_tokenizer
from pipelines.original_layout import layout_state_dict, open_clip_state


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = build_tokenizer(["a red circle"], vocab_size=600, max_length=16)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32)
    return {"te": build_text_encoder(tok, 64, 2, 2, 128), "vae": vae,
            "te2": build_text_encoder(tok, 64, 2, 2, 128, with_projection=True)}


def _unet(xl=False):
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=64 + 6 * 8) if xl else {}
    return UNet2DConditionModel(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=128 if xl else 64,
                                attention_head_dim=8, norm_num_groups=32, **extra)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _save(state, path, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def test_sd1_sd2_and_xl_files_without_configs_are_recognised_and_load_every_weight(tmp_path, parts, caplog):
    unet = _unet()
    sd1 = LDMPipeline.from_single_file(_save(layout_state_dict(unet, parts["vae"], parts["te"]), tmp_path / "sd1.safetensors"))
    assert type(sd1).__name__ == "LDMPipeline" and sd1.scheduler.config.prediction_type == "epsilon"
    assert _same(sd1.unet, unet) and _same(sd1.vae, parts["vae"]) and _same(sd1.text_encoder, parts["te"])
    assert sd1.vae.config.scaling_factor == 0.18215 and len(sd1.tokenizer) == 49408

    # 2.x: OpenCLIP's names under cond_stage_model.model., used to the penultimate layer
    state = {k: v for k, v in layout_state_dict(unet, parts["vae"], parts["te"]).items()
             if not k.startswith("cond_stage_model.")}
    state.update({k.replace("conditioner.embedders.1.model.", "cond_stage_model.model."): v
                  for k, v in open_clip_state(parts["te2"]).items()})
    with caplog.at_level(logging.WARNING):
        sd2 = LDMPipeline.from_single_file(_save(state, tmp_path / "sd2.safetensors"))
    assert sd2.scheduler.config.prediction_type == "v_prediction" and "taken as v-prediction" in caplog.text
    assert sd2.text_encoder.config.num_hidden_layers == 1 and sd2.tokenizer.pad_token == "!"
    assert torch.equal(sd2.text_encoder.text_model.embeddings.token_embedding.weight if hasattr(
        sd2.text_encoder, "text_model") else sd2.text_encoder.embeddings.token_embedding.weight,
        parts["te2"].state_dict()[next(k for k in parts["te2"].state_dict() if k.endswith("token_embedding.weight"))])
    said = _save(state, tmp_path / "sd2-base.safetensors", {"modelspec.prediction_type": "epsilon"})
    assert LDMPipeline.from_single_file(said).scheduler.config.prediction_type == "epsilon"

    xl_unet = _unet(xl=True)
    xl = LDMPipeline.from_single_file(_save(layout_state_dict(xl_unet, parts["vae"], parts["te"], parts["te2"]),
                                            tmp_path / "xl.safetensors"))
    assert type(xl).__name__ == "LDMXLPipeline" and _same(xl.unet, xl_unet) and _same(xl.text_encoder_2, parts["te2"])
    assert xl.vae.config.scaling_factor == 0.13025 and xl.unet.config.addition_time_embed_dim == 8


def test_a_file_of_no_known_family_is_refused_by_name(tmp_path):
    path = _save({"some.weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="holds neither Stable Diffusion|no Stable Diffusion 1.x, 2.x or XL"):
        LDMPipeline.from_single_file(path)


def test_the_shipped_clip_merges_give_clips_own_token_ids(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408

"""Single-file checkpoints in Stable Diffusion's original layout: diffusers' own converter reads what we write
back to the same weights and images; our loader rebuilds the pipeline from the file alone; the CLI writes one;
what the layout cannot hold is refused by name; training starts from a file."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.export import main as export_main
from pipelines import (
    LDMPipeline,
    SuperResolutionPipeline,
    from_single_file,
    low_res_scheduler,
    to_single_file,
)
from pipelines.original_layout import UNET_PREFIX, VAE_PREFIX, layout_state_dict
from pipelines.single_file import config_dir, materialize

PROMPT = "a red circle at the top left"
CAPTIONS = [PROMPT, "a blue square at the bottom right", "a green triangle in the middle"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_components(linear_projection=False):
    """An SD-architecture pipeline's parts: two cross-attention levels of two layers and a plain one, a 3-level
    VAE with mid-block attention, a tiny CLIP text encoder on a tokenizer learned from the captions."""
    from ldm.models.text import build_text_encoder, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(CAPTIONS, vocab_size=600, max_length=16)
    te = build_text_encoder(tok, 32, 2, 2, 64)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32], layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=linear_projection)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], latent_channels=4,
                        layers_per_block=2, norm_num_groups=8, sample_size=32, scaling_factor=0.5)
    # steps_offset=0: StableDiffusionPipeline would rewrite it to 1; ours must keep the scheduler as saved.
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, steps_offset=0)
    return {"vae": vae, "text_encoder": te, "tokenizer": tok, "unet": unet, "scheduler": sched}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    LDMPipeline(**tiny_components()).save_pretrained(root / "pipeline")
    file = to_single_file(LDMPipeline.from_pretrained(root / "pipeline"), root / "model.safetensors")
    return {"folder": root / "pipeline", "file": file}


def draw(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe([PROMPT], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_diffusers_reads_the_file_back_to_the_same_weights_and_images(exported):
    file = exported["file"]
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    # Every weight under the original names, none under diffusers' (spot checks of what the levels give).
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.transformer.text_model.")) for k in keys)
    assert not [k for k in keys if "resnets" in k or "down_blocks" in k or "up_blocks" in k]
    state = load_file(file)
    assert state[UNET_PREFIX + "input_blocks.3.0.op.weight"].ndim == 4  # the first level's downsampler
    assert UNET_PREFIX + "input_blocks.8.0.in_layers.0.weight" in keys  # the plain level's second resnet
    assert UNET_PREFIX + "output_blocks.2.1.conv.weight" in keys  # the plain level's upsampler
    assert UNET_PREFIX + "output_blocks.5.2.conv.weight" in keys  # after a level's attention
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert VAE_PREFIX + "decoder.up.0.block.2.nin_shortcut.weight" not in keys
    assert VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight" in keys  # 16 -> 8 channels at the top

    ours = LDMPipeline.from_pretrained(exported["folder"])
    theirs = StableDiffusionPipeline.from_single_file(str(file), config=str(config_dir(file)),
                                                      local_files_only=True)
    assert_same_weights(ours, theirs)
    reference = StableDiffusionPipeline.from_pretrained(exported["folder"])
    diff = np.abs(draw(theirs) - draw(reference)).max()
    assert diff <= 2e-3, diff


def test_our_loader_rebuilds_the_pipeline_from_the_file_alone(exported, tmp_path):
    lone = tmp_path / "lone.safetensors"  # no config folder beside it: the metadata holds the configs
    lone.write_bytes(exported["file"].read_bytes())
    ours = LDMPipeline.from_pretrained(exported["folder"])
    loaded = LDMPipeline.from_single_file(lone)
    assert_same_weights(ours, loaded)
    assert dict(loaded.scheduler.config) == dict(ours.scheduler.config)  # steps_offset=0 kept
    assert loaded.tokenizer.get_vocab() == ours.tokenizer.get_vocab()
    reference = draw(ours)
    diff = np.abs(draw(loaded) - reference).max()
    assert diff <= 2e-3, diff
    folder = materialize(lone, tmp_path / "materialized")
    assert np.abs(draw(LDMPipeline.from_pretrained(folder)) - reference).max() <= 2e-3
    assert StableDiffusionPipeline.from_pretrained(folder).unet.config.layers_per_block == 2


def test_configs_from_the_folder_beside_or_from_config_else_a_clear_error(exported, tmp_path):
    bare = tmp_path / "bare.safetensors"  # the weights without metadata, as files made elsewhere are
    save_file(load_file(exported["file"]), bare)
    with pytest.raises(ValueError, match="pass config="):
        from_single_file(bare)
    ours = LDMPipeline.from_pretrained(exported["folder"])
    assert_same_weights(ours, from_single_file(bare, config=config_dir(exported["file"])))
    assert_same_weights(ours, from_single_file(bare, config=exported["folder"]))  # a full folder serves too
    import shutil

    shutil.copytree(config_dir(exported["file"]), config_dir(bare))
    assert_same_weights(ours, from_single_file(bare))


def test_linear_projections_and_fp16_round_trip(tmp_path):
    comp = tiny_components(linear_projection=True)
    pipe = LDMPipeline(**comp)
    file = to_single_file(pipe, tmp_path / "linear.safetensors", dtype="fp16")
    state = load_file(file)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert state[UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].ndim == 2  # Linear, as SD 2.x has it
    loaded = from_single_file(file)
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(pipe, name).state_dict()
        for k, v in getattr(loaded, name).state_dict().items():
            assert torch.equal(v.float(), want[k].half().float()), f"{name}.{k}"


def test_stable_diffusion_15_architecture_maps_to_its_original_names():
    """SD 1.5's U-Net and VAE configs (built on the meta device) give the key names of SD 1.5 checkpoints."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD 1.x's
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2)
        from transformers import CLIPTextConfig, CLIPTextModel

        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          max_position_embeddings=77))  # CLIP ViT-L/14's text tower
    state = layout_state_dict(unet, vae, te)
    counts = {p: sum(k.startswith(p) for k in state) for p in (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")}
    assert counts == {UNET_PREFIX: 686, VAE_PREFIX: 248, "cond_stage_model.": 196}
    for key in ["input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.9.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "time_embed.2.weight", "out.2.weight"]:
        assert UNET_PREFIX + key in state, key
    for key in ["encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "decoder.up.3.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
                "decoder.up.0.block.2.conv2.weight", "decoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight",
                "post_quant_conv.weight"]:
        assert VAE_PREFIX + key in state, key
    assert state[VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in state


def test_cli_writes_the_file_and_its_config_folder(exported, tmp_path, capsys):
    out = tmp_path / "cli" / "model.safetensors"
    export_main(["single-file", "--pipeline", str(exported["folder"]), "--out", str(out), "--dtype", "bf16"])
    assert str(out) in capsys.readouterr().out
    assert all(v.dtype == torch.bfloat16 for v in load_file(out).values())
    index = json.loads((config_dir(out) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert not list(config_dir(out).rglob("*.safetensors"))  # configs only
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.config", "model.safetensors"]  # no temp files


def test_cli_refuses_pixel_space_and_super_resolution_pipelines(tmp_path, capsys):
    comp = tiny_components()
    LDMPipeline(**{**comp, "vae": None}).save_pretrained(tmp_path / "pixels")
    torch.manual_seed(0)
    sr_unet = UNet2DConditionModel(sample_size=8, in_channels=7, out_channels=4, block_out_channels=[32, 32],
                                   layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                                   attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000)
    SuperResolutionPipeline(vae=comp["vae"], text_encoder=comp["text_encoder"], tokenizer=comp["tokenizer"],
                            unet=sr_unet, low_res_scheduler=low_res_scheduler(),
                            scheduler=comp["scheduler"]).save_pretrained(tmp_path / "sr")
    for folder, reason in (("pixels", "vae=None"), ("sr", "num_class_embeds=1000")):
        out = tmp_path / f"{folder}.safetensors"
        with pytest.raises(SystemExit) as stop:
            export_main(["single-file", "--pipeline", str(tmp_path / folder), "--out", str(out)])
        assert stop.value.code == 2
        assert reason in capsys.readouterr().err
        assert not out.exists() and not config_dir(out).exists()


@pytest.mark.parametrize("change, reason", [
    ({"mid_block_type": None}, "mid_block_type=None"),
    ({"layers_per_block": [1, 2, 2]}, "layers_per_block=[1, 2, 2]"),
    ({"down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
     "SimpleCrossAttnDownBlock2D"),
    ({"time_cond_proj_dim": 8}, "time_cond_proj_dim=8"),
])
def test_unets_the_layout_cannot_hold_are_refused_by_name(tmp_path, change, reason):
    comp = tiny_components()
    plain = {k: v for k, v in comp["unet"].config.items() if not k.startswith("_")}  # (_use_default_values)
    comp["unet"] = UNet2DConditionModel.from_config({**plain, **change})
    with pytest.raises(ValueError, match=reason.replace("[", r"\[")):
        to_single_file(LDMPipeline(**comp), tmp_path / "bad.safetensors")


def test_lora_adapters_are_refused_and_a_failed_write_keeps_the_old_file(exported, tmp_path, monkeypatch):
    from peft import LoraConfig

    pipe = LDMPipeline.from_pretrained(exported["folder"])
    file = to_single_file(pipe, tmp_path / "model.safetensors")
    before = file.read_bytes()
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="LoRA"):
        to_single_file(pipe, file)
    pipe.unet.delete_adapters("default")

    import safetensors.torch

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        to_single_file(LDMPipeline.from_pretrained(exported["folder"]), file)
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.config", "model.safetensors"]


def test_training_starts_from_a_single_file(tmp_path, tiny_cfg, data_dir, tiny_vae_dir):
    import datasets
    from tiny_models import sd_folder

    from ldm.trainer.train import train

    captions = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")["text"]
    base = LDMPipeline.from_pretrained(sd_folder(tmp_path / "sd", tiny_vae_dir, captions))
    file = to_single_file(base, tmp_path / "base.safetensors")
    import shutil

    shutil.rmtree(tmp_path / "sd")
    shutil.rmtree(config_dir(file))  # the file alone
    cfg = tiny_cfg(f"model.pretrained={file}", "train.max_steps=1", "train.learning_rate=1e-7",
                   "train.warmup_steps=0")
    train(cfg)
    made = list((tmp_path / "single-file").iterdir())
    assert len(made) == 1 and made[0].name.startswith("base-")  # <cache_dir>/../single-file/<stem>-<hash>
    out = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    # The frozen VAE and text encoder, the tokenizer and the schedule are the file's; the U-Net moved by ~lr.
    for name in ("vae", "text_encoder"):
        for k, v in getattr(out, name).state_dict().items():
            assert torch.equal(v, getattr(base, name).state_dict()[k]), f"{name}.{k}"
    assert out.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    assert out.scheduler.config.prediction_type == "v_prediction"
    start = base.unet.state_dict()
    moved = max((v - start[k]).abs().max().item() for k, v in out.unet.state_dict().items())
    assert 0 < moved < 1e-5, moved


class _Payload:
    """What a hostile pickle holds: unpickling it would run code (here, create a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_ckpt_is_read_as_tensors_only_and_a_hostile_one_is_refused_without_running(tmp_path, exported):
    import shutil

    tensors = load_file(exported["file"])
    torch.save({"state_dict": tensors, "global_step": 10}, tmp_path / "model.ckpt")  # CompVis' wrapper
    shutil.copytree(config_dir(exported["file"]), tmp_path / "model.config")
    pipe = LDMPipeline.from_single_file(tmp_path / "model.ckpt")
    assert_same_weights(pipe, LDMPipeline.from_single_file(exported["file"]))
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": tensors, "extra": _Payload(marker)}, tmp_path / "hostile.ckpt")
    shutil.copytree(config_dir(exported["file"]), tmp_path / "hostile.config")
    with pytest.raises(ValueError, match="asks to build more than tensors.*nothing in it ran"):
        LDMPipeline.from_single_file(tmp_path / "hostile.ckpt")
    assert not marker.exists()

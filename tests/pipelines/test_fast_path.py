"""The fast paths change speed, not results: a training run with its U-Net compiled block by block and in
channels-last follows the eager run's losses, and `LDMPipeline.enable_fast` draws the eager pipeline's images
(tiny components on CPU). The default suite compiles with the aot_eager backend (dynamo's capture, seconds);
`make test-slow` with inductor, the default, which generates and builds the kernels (minutes on a cold cache)."""

import numpy as np
import pytest
import torch
from tiny_models import sd_folder

from ldm.engine.records import read_metrics
from ldm.trainer.config import check_config
from ldm.trainer.train import fast_path, train
from pipelines import LDMPipeline
from pipelines.fast import compile_model, is_compiled, uncompile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_switches_resolve_per_device(tiny_cfg):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tc = tiny_cfg().train
    assert (tc.compile, tc.channels_last) == ("auto", "auto")
    assert fast_path(tc, cpu) == (None, False) and fast_path(tc, cuda) == ("regional", True)
    for value, how in ((True, "full"), (False, None), ("full", "full"), ("regional", "regional")):
        tc.compile = value
        assert fast_path(tc, cpu)[0] == how
    with pytest.raises(ValueError, match="train.compile='fast' is not null or one of"):
        check_config(tiny_cfg("train.compile=fast"))


def test_regional_compilation_covers_the_blocks_and_undoes():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=[32, 32], layers_per_block=1, norm_num_groups=8,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
    names = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert not names
    n = compile_model(unet, "regional")
    names = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert names == {"BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D"} and n >= 8
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in unet.state_dict())
    uncompile(unet)
    assert not is_compiled(unet)
    with pytest.raises(ValueError, match="compile='fast' is not one of"):
        compile_model(unet, "fast")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_channels_last_training_follows_the_eager_losses(tiny_cfg, monkeypatch, backend):
    # aot_eager: dynamo's capture and the forward/backward split without inductor's code generation (seconds);
    # inductor, the default backend, generates and compiles the kernels (two minutes on a cold cache)
    import ldm.trainer.train

    compiled = []  # (how, blocks compiled, U-Net in channels-last) of every compilation the trainer asks for

    def record(model, how):
        channels_last = model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        compiled.append((how, compile_model(model, how, backend=backend), channels_last))

    monkeypatch.setattr(ldm.trainer.train, "compile_model", record)
    for options in ([], ["train.gradient_checkpointing=true"])[:2 if backend == "inductor" else 1]:
        losses, compiled[:] = [], []
        for extra in (["train.compile=false", "train.channels_last=false"],
                      ["train.compile=regional", "train.channels_last=true"]):
            cfg = tiny_cfg("train.max_steps=6", "train.log_every=1", f"name={extra[0][-5:]}{len(options)}",
                           *extra, *options)
            train(cfg)
            losses.append([r["loss"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")
                           if "loss" in r and "epoch" in r])
        assert len(losses[0]) == 6
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
        # the second run really was compiled block by block, in channels-last; the first not at all
        assert len(compiled) == 1 and compiled[0][0] == "regional" and compiled[0][1] >= 8 and compiled[0][2]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_enable_fast_draws_the_eager_images_and_disable_restores(tmp_path, tiny_vae_dir, backend):
    folder = sd_folder(tmp_path / "sd", tiny_vae_dir, ["a red circle at the top left", "a blue square"])
    pipe = LDMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "output_type": "np"}

    def draw():
        return pipe(["a red circle at the top left"] * 2, generator=torch.Generator().manual_seed(0), **kw).images

    eager = draw()
    pipe.enable_fast(channels_last=True, backend=backend)  # regional: U-Net and VAE decoder blocks; fused QKV
    assert pipe._fused_qkv and is_compiled(pipe.unet) and is_compiled(pipe.vae.decoder)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(draw(), eager, atol=1e-4)
    np.testing.assert_allclose(draw(), eager, atol=1e-4)  # warm: compiled code reused
    pipe.disable_fast()
    assert not pipe._fused_qkv and not is_compiled(pipe.unet) and not is_compiled(pipe.vae.decoder)
    np.testing.assert_array_equal(draw(), eager)

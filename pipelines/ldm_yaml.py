"""The original (CompVis latent-diffusion) model config of a Stable Diffusion 1.x/2.x pipeline, the ``.yaml`` that
AUTOMATIC1111 and Forge read beside a single file (``model.safetensors`` + ``model.yaml``): without it they guess
the model from its keys and sample a v-prediction model as an ε one (noise), and cannot build an architecture
other than the released ones. It is made from the pipeline's own diffusers configs, so diffusers' reader of such
configs (``create_unet_diffusers_config_from_ldm``) gives the same U-Net back."""

from __future__ import annotations

from pathlib import Path

CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"  # Stable Diffusion 1.x: CLIP ViT-L, last layer
OPEN_CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"  # 2.x: OpenCLIP ViT-H, penultimate


def _heads(unet) -> dict:
    """The attention heads as the original config says them: ``num_heads`` (one count everywhere) or
    ``num_head_channels`` (one width everywhere, with linear projections, as Stable Diffusion 2.x)."""
    heads = unet.attention_head_dim  # diffusers' historical name: the number of heads when num_attention_heads is unset
    if unet.get("num_attention_heads") is not None:
        heads = unet.num_attention_heads
    if isinstance(heads, int):
        return {"num_heads": heads}
    widths = {c // h for c, h in zip(unet.block_out_channels, heads)}
    if len(widths) != 1 or not unet.use_linear_projection:
        raise ValueError(f"the U-Net's attention heads {list(heads)} over channels {list(unet.block_out_channels)} "
                         f"have no original-config form (one head count, or one head width with linear projections)")
    return {"num_head_channels": widths.pop()}


def _unet_params(unet) -> dict:
    base = unet.block_out_channels[0]
    if any(c % base for c in unet.block_out_channels):
        raise ValueError(f"the U-Net's channels {list(unet.block_out_channels)} are not multiples of the first")
    depth = unet.transformer_layers_per_block
    return {"image_size": unet.sample_size, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
            "model_channels": base, "channel_mult": [c // base for c in unet.block_out_channels],
            "num_res_blocks": unet.layers_per_block,
            "attention_resolutions": [2 ** i for i, kind in enumerate(unet.down_block_types)
                                      if kind.startswith("CrossAttn")],
            **_heads(unet), "use_spatial_transformer": True,
            "transformer_depth": depth if isinstance(depth, int) else list(depth),
            "context_dim": unet.cross_attention_dim, "use_linear_in_transformer": bool(unet.use_linear_projection),
            "use_checkpoint": False, "legacy": False}


def _vae_params(vae) -> dict:
    base = vae.block_out_channels[0]
    return {"embed_dim": vae.latent_channels, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": vae.latent_channels, "resolution": vae.sample_size,
                         "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": base,
                         "ch_mult": [c // base for c in vae.block_out_channels],
                         "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}


def original_config(pipe) -> dict:
    """The original config (as a dict) of a Stable Diffusion 1.x/2.x pipeline with a VAE: its schedule (and
    ``parameterization: v`` for v-prediction), U-Net, VAE and text encoder kind (a 1024-wide context is 2.x's
    OpenCLIP)."""
    unet, vae, sched = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    if unet.get("addition_embed_type") is not None:
        raise ValueError("Stable Diffusion XL files carry their schedule in the file (v_pred / ztsnr markers); the "
                         "original config .yaml is for Stable Diffusion 1.x/2.x")
    for name, config in (("U-Net", unet), ("VAE", vae)):
        if config.norm_num_groups != 32:
            raise ValueError(f"the {name}'s norm_num_groups={config.norm_num_groups}: the original code normalises in "
                             f"32 groups, so it cannot build this model")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction!r}: the original config knows epsilon and v only")
    two = unet.cross_attention_dim == 1024
    cond = {"target": OPEN_CLIP_EMBEDDER, "params": {"freeze": True, "layer": "penultimate"}} if two else \
        {"target": CLIP_EMBEDDER}
    params = {"linear_start": sched["beta_start"], "linear_end": sched["beta_end"], "num_timesteps_cond": 1,
              "log_every_t": 200, "timesteps": sched["num_train_timesteps"], "first_stage_key": "jpg",
              "cond_stage_key": "txt", "image_size": unet.sample_size, "channels": unet.in_channels,
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
              "scale_factor": vae.get("scaling_factor", 0.18215), "use_ema": False,
              **({"parameterization": "v"} if prediction == "v_prediction" else {}),
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                              "params": _unet_params(unet)},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _vae_params(vae)},
              "cond_stage_config": cond}
    return {"model": {"base_learning_rate": 1.0e-04, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def yaml_path(single_file: str | Path) -> Path:
    """Where AUTOMATIC1111 looks for a single file's config: beside it, with the same stem."""
    return Path(single_file).with_suffix(".yaml")

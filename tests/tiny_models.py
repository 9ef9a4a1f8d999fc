"""Tiny components shared by tests: an SD-architecture VAE, a Stable Diffusion 1.x pipeline folder, and the
components of a tiny pipeline over a byte-level CLIP tokenizer."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_vae(path: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16],
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32,
                        scaling_factor=1.0)
    vae.save_pretrained(path, safe_serialization=True)
    return path


def sd_folder(root: Path, vae_dir: Path, captions: list[str], prediction_type: str = "v_prediction") -> Path:
    """A tiny Stable Diffusion 1.x folder, as StableDiffusionPipeline saves it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ldm.models.text import build_text_encoder, build_tokenizer

    torch.manual_seed(1)
    tok = build_tokenizer(captions, vocab_size=600, max_length=16)
    te = build_text_encoder(tok, 32, 1, 2, 64)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=te, tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


# Whole words on top of the byte alphabet, with the BPE merges that build them.
WORD_MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]


def _byte_level_alphabet():
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses to stand for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def write_tiny_clip_vocab(directory):
    """Write a tiny byte-level BPE vocab.json + merges.txt into `directory`."""
    alphabet = _byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    tokens += ["".join(m.split()) for m in WORD_MERGES]
    directory = Path(directory)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(WORD_MERGES) + "\n", encoding="utf-8")


def get_dummy_components(tokenizer_dir, unet_out_channels=4, scheduler=None, vae_shift_factor=None):
    # transformers 5 ignores vocab_file=/merges_file= kwargs in CLIPTokenizer(...) (it silently builds a
    # 3-token vocab), so load through from_pretrained on the folder holding vocab.json + merges.txt.
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=16)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),  # scale factor 2: 8x8 latents <-> 16x16 images
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=vae_shift_factor,
    )
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=unet_out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    # steps_offset=1 / clip_sample=False: StableDiffusionPipeline.__init__ silently rewrites other values, which
    # would make its samples differ from ours in the equivalence test.
    if scheduler is None:
        scheduler = DDPMScheduler(num_train_timesteps=100, steps_offset=1, clip_sample=False)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def make_pipe(tokenizer_dir, **kwargs):
    from pipelines import LDMPipeline

    pipe = LDMPipeline(**get_dummy_components(tokenizer_dir, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_folder(root: Path, vae_dir: Path, captions: list[str], prediction_type: str = "epsilon",
                force_zeros_for_empty_prompt: bool = True, zero_snr: bool = False, width_2: int = 32) -> Path:
    """A tiny Stable Diffusion XL folder, as diffusers' StableDiffusionXLPipeline saves it: two text encoders
    (CLIP-L's kind, and bigG's kind with a projection, ``width_2`` wide), a U-Net with SDXL's added text/time
    conditions."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    from ldm.models.text import build_tokenizer

    torch.manual_seed(2)
    tok = build_tokenizer(captions, vocab_size=600, max_length=16)
    tok_2 = build_tokenizer(captions, vocab_size=600, max_length=16)
    common = dict(vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_attention_heads=2)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **common))
    te_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width_2, num_hidden_layers=2, intermediate_size=64,
                                                      projection_dim=16, **common))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32],
                                layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32 + width_2,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    sched = EulerDiscreteScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr,
                                   timestep_spacing="trailing" if zero_snr else "leading")
    pipe = StableDiffusionXLPipeline(vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=te, text_encoder_2=te_2,
                                     tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


class ZeroText:
    """A text context of zeros (b, 1, 1) for objectives whose denoiser reads none."""

    @staticmethod
    def encode(captions, drop, device):
        return torch.zeros(len(captions), 1, 1), {}


def record_added_conditions(monkeypatch) -> list[dict]:
    """Record the ``added_cond_kwargs`` (cloned) of every U-Net forward that builds a graph (the training ones):
    the returned list fills as training runs; ``monkeypatch.undo()`` puts the real forward back."""
    seen = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *args, added_cond_kwargs=None, **kwargs):
        if torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in added_cond_kwargs.items()})
        return real(self, sample, timestep, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return seen


def write_shards(folder: Path, num_shards: int, per_shard: int, size: int = 32, bad: dict | None = None,
                 shapes: list[tuple[int, int]] | None = None) -> list[Path]:
    """Webdataset shards ``shard-0000.tar``... of ``per_shard`` samples each (``s0003_0001.png`` + ``.txt``): a
    flat colour per sample, the caption naming the sample. ``bad``: {key: "image" | "caption" | "small"} writes that
    sample broken (bytes that are no image, no caption, an image of 4 x 4 pixels). ``shapes``: (width, height) of the
    samples in turn, instead of ``size`` squares."""
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    bad, paths = bad or {}, []
    for s in range(num_shards):
        path = folder / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s:04d}_{i:04d}"
                shape = shapes[(s * per_shard + i) % len(shapes)] if shapes else (size, size)
                buf = io.BytesIO()
                Image.new("RGB", (4, 4) if bad.get(key) == "small" else shape, ((37 * s) % 256, (11 * i) % 256, 128)).save(buf, format="PNG")
                files = {f"{key}.png": b"not an image" if bad.get(key) == "image" else buf.getvalue()}
                if bad.get(key) != "caption":
                    files[f"{key}.txt"] = f"a square of shard {s} number {i}".encode()
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def sidecar_folder(root, data_dir, n=12, start=0, ext=".txt", repeat_folder=None):
    """``n`` of the shapes images with their captions as tag lists in caption files; with ``repeat_folder``
    (e.g. "3_blob") another 4 images in that sub-folder with no caption files."""
    import json
    import shutil

    rows = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    root.mkdir(parents=True, exist_ok=True)
    for row in rows[start:start + n]:
        shutil.copy(data_dir / row["file_name"], root / row["file_name"])
        text = row["text"] if isinstance(row["text"], str) else row["text"][0]
        (root / row["file_name"]).with_suffix(ext).write_text(f"sks, {text}, plain, small")
    if repeat_folder:
        (root / repeat_folder).mkdir()
        for row in rows[start + n:start + n + 4]:
            shutil.copy(data_dir / row["file_name"], root / repeat_folder / row["file_name"])
    return root

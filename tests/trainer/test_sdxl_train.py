"""Fine-tuning a Stable Diffusion XL folder (tiny, SDXL-architecture, built in code): the size/crop conditions follow
the data path, the U-Net gets them with the pooled text, the export loads in diffusers' StableDiffusionXLPipeline
and draws the same images, resume is bit-identical, and what is not supported for SDXL is refused by name."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import record_added_conditions, sdxl_folder

from ldm.data.batches import PixelItems
from ldm.data.size_conditions import SizeConditions
from ldm.data.splits import load_splits
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig, check_config
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(48, 32), (32, 48), (40, 40), (64, 32), (32, 32), (56, 40)]  # (w, h)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """Images of several sizes and aspects, each a different pattern, with captions."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": ["a red circle", "a blue square", "a green triangle"][i % 3]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory, tiny_vae_dir):
    return sdxl_folder(tmp_path_factory.mktemp("xl"), tiny_vae_dir,
                       ["a red circle", "a blue square", "a green triangle", "a red circle at the top left"])


def _cfg(tmp_path, xl, data, *extra):
    return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"model.pretrained={xl}", f"data.dataset={data}",
        f"data.cache_dir={tmp_path / 'cache'}", "sample.seeds=[0]", "sample.num_inference_steps=2",
        "train.tensorboard=false", "train.batch_size=4", "data.validation_num_images=4", *extra])


@pytest.mark.parametrize("random_crop, crop_scale", [(False, 1.0), (True, 1.0), (True, 1.25), (False, 1.5)])
def test_time_ids_describe_the_crop_the_pixels_get(tmp_path, xl_dir, mixed_dir, random_crop, crop_scale):
    from diffusers import StableDiffusionXLPipeline

    cfg = _cfg(tmp_path, xl_dir, mixed_dir, "data.bucketing=true", "data.bucket_step=8", "data.center_crop=false",
               f"data.random_crop={str(random_crop).lower()}", f"data.crop_scale={crop_scale}")
    split = load_splits(cfg)[0]
    conditions = SizeConditions(split, cfg.data, random_crop)
    items = PixelItems.for_split(split, cfg.data, random_crop)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    for i in range(len(SIZES)):
        for flip in (False, True):
            seed = 1000 + i
            h, w, top, left, th, tw = conditions.time_ids(i, flip, seed)
            image = split.ds[i]["image"].convert("RGB")
            assert (h, w) == (image.height, image.width) and (th, tw) == split.sizes[i]
            scale = max(tw / w, th / h) * crop_scale
            resized = image.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.Resampling.BICUBIC)
            if flip:  # the mirrored picture is the mirrored resize's crop at the condition's offset
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop = np.asarray(resized.crop((left, top, left + tw, top + th)), dtype=np.float32) / 127.5 - 1
            pixels = items[(i, flip, seed)].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(pixels, crop, atol=1e-6)
            expected = pipe._get_add_time_ids((h, w), (top, left), (th, tw), torch.float32, 16)
            assert conditions.load([i], torch.tensor([flip]), torch.tensor([seed])).tolist() == expected.tolist()
    if not random_crop:  # the top-left corner: no offset unless mirrored
        assert all(conditions.time_ids(i)[2:4] == [0, 0] for i in range(len(SIZES)))
    else:
        assert any(conditions.time_ids(i, False, s)[2:4] != [0, 0] for i in range(len(SIZES)) for s in range(5))


def test_fine_tune_exports_a_folder_diffusers_draws_the_same(tmp_path, xl_dir, mixed_dir, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from pipelines import LDMPipeline

    seen = record_added_conditions(monkeypatch)
    cfg = _cfg(tmp_path, xl_dir, mixed_dir, "data.bucketing=true", "data.bucket_step=8", "data.random_flip=true",
               "train.max_steps=4", "train.learning_rate=0.001", "data.caption_dropout=0.5")
    train(cfg)
    # every training forward had the pooled text (zeros for dropped captions) and the images' size conditions
    assert len(seen) == 4 and all(s["text_embeds"].shape == (4, 16) and s["time_ids"].shape == (4, 6) for s in seen)
    originals = {(h, w) for w, h in SIZES}
    assert all((int(r[0]), int(r[1])) in originals for s in seen for r in s["time_ids"])
    assert any(not s["text_embeds"].any(dim=1).all() for s in seen)  # dropped captions: zeros
    out = cfg.run_dir / "pipeline"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    for part, name in [("text_encoder", "model"), ("text_encoder_2", "model"), ("vae", "diffusion_pytorch_model")]:
        a, b = load_file(xl_dir / part / f"{name}.safetensors"), load_file(out / part / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (xl_dir, out))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    ours, theirs = LDMPipeline.from_pretrained(out), StableDiffusionXLPipeline.from_pretrained(out)
    draws = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        draws.append(pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=5.0,
                          generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images)
    assert np.abs(draws[0] - draws[1]).max() <= 2e-3
    assert (cfg.run_dir / "samples" / "step-4.png").is_file()


@pytest.mark.parametrize("extra", [["data.random_crop=true", "data.random_flip=true"], ["data.bucketing=true"]])
def test_resume_is_bitwise_identical(tmp_path, xl_dir, mixed_dir, extra):
    args = ["train.max_steps=6", "train.checkpoint_every=3", "data.bucket_step=8", *extra]
    full = _cfg(tmp_path, xl_dir, mixed_dir, "name=full", *args)
    train(full)
    resumed = _cfg(tmp_path, xl_dir, mixed_dir, "name=resumed", "train.resume=latest", *args)
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step-3", resumed.run_dir / "checkpoints" / "step-3")
    train(resumed)
    a, b = (load_file(c.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") for c in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, key", [
    ("stage=super_resolution", "stage"),
])
def test_what_sdxl_does_not_train_yet_is_refused_by_name(tmp_path, xl_dir, override, key):
    cfg = _cfg(tmp_path, xl_dir, tmp_path / "no-data", override)
    with pytest.raises(ValueError, match=rf"^{key}="):
        check_config(cfg)


def test_dropped_captions_are_zeros_or_the_empty_caption():
    from ldm.trainer.sdxl import XLTextContext, XLTextInputs

    cache = {"embeds": np.ones((3, 4, 8), np.float32), "pooled": np.ones((3, 2), np.float32),
             "empty": np.full((1, 4, 8), 0.5, np.float32), "empty_pooled": np.full((1, 2), 0.5, np.float32)}
    drop = torch.tensor([True, False])
    for zeros, value in ((True, 0.0), (False, 0.5)):
        context, more = XLTextContext(XLTextInputs(torch.zeros(3, 2, 4), torch.zeros(2, 4), cache), [], zeros).encode(
            torch.tensor([0, 2]), drop, "cpu")
        assert (context[0] == value).all() and (more["text_embeds"][0] == value).all()
        assert (context[1] == 1).all() and (more["text_embeds"][1] == 1).all()


def test_training_encodes_captions_as_diffusers_encode_prompt(xl_dir):
    """The trainer's text context (encoders every step, or the cache's fill, and validation's) is diffusers'."""
    from diffusers import StableDiffusionXLPipeline

    from ldm.models.components import second_text_side
    from ldm.trainer.sdxl import XLTextContext, XLTextInputs, XLTextToImage

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True)
    comp = type("Comp", (), {"tokenizer": pipe.tokenizer, **second_text_side(Path(xl_dir))})
    captions = ["a red circle", "a blue square at the top left"]
    ids = XLTextToImage.tokenize(None, comp, captions)
    assert ids.shape == (2, 2, 16)
    encoders = [pipe.text_encoder, comp.text_encoder_2]
    text = XLTextContext(XLTextInputs(ids, ids[0], None), encoders, force_zeros=False)
    with torch.no_grad():
        context, more = text.encode(torch.tensor([1, 0]), torch.zeros(2, dtype=torch.bool), "cpu")
        valid, valid_more = text.validation_context(None, ids, "cpu")
        want, _, pooled, _ = pipe.encode_prompt(captions[::-1], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(context, want, rtol=0, atol=0)
    torch.testing.assert_close(more["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(valid, want.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(valid_more["text_embeds"], pooled.flip(0), rtol=0, atol=0)


def test_the_sdxl_preset_runs_at_tiny_sizes(tmp_path, xl_dir, mixed_dir):
    text = (ROOT / "configs/ldm/sdxl-finetune-1024.yaml").read_text()
    assert text.startswith("#") and "Sized for" in text
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/sdxl-finetune-1024.yaml", [
        f"output_dir={tmp_path}", f"model.pretrained={xl_dir}", f"data.dataset={mixed_dir}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32", "data.bucket_step=8", "train.batch_size=2",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.optimizer=adamw",
        "train.max_steps=2", "train.num_workers=0", "data.validation_fraction=0.2", "data.validation_num_images=4",
        "sample.num_inference_steps=2", "sample.seeds=[0]", "train.tensorboard=false"])
    train(cfg)
    assert (cfg.run_dir / "pipeline" / "text_encoder_2" / "model.safetensors").is_file()


def test_lora_on_sdxl_loads_in_diffusers_from_both_layouts(tmp_path, xl_dir, mixed_dir):
    from diffusers import StableDiffusionXLPipeline

    from ldm.methods.lora import KOHYA_FILE, LORA_FILE
    from pipelines import LDMPipeline

    cfg = load_config(LDMConfig, ROOT / "configs/ldm/lora-sdxl.yaml", [
        f"output_dir={tmp_path}", f"model.pretrained={xl_dir}", f"data.dataset={mixed_dir}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32", "data.bucket_step=8", "train.batch_size=2",
        "train.mixed_precision=no", "finetune.base_dtype=fp32", "finetune.lora_rank=4", "finetune.lora_alpha=8",
        "train.learning_rate=0.01", "train.max_steps=3", "train.num_workers=0", "data.validation_num_images=4",
        "sample.num_inference_steps=2", "sample.seeds=[0]", "train.tensorboard=false", "finetune.merged_export=true"])
    train(cfg)
    folder = cfg.run_dir / "lora"
    kohya = load_file(folder / KOHYA_FILE)
    assert kohya and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                       "lora_unet_output_blocks_")) for k in kohya)
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))  # alpha 8 / rank 4: scale 2

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=5.0,
                    generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images

    reference = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    reference.load_lora_weights(str(folder), weight_name=LORA_FILE)
    want = draw(reference)
    assert np.abs(want - draw(LDMPipeline.from_pretrained(xl_dir))).max() > 1e-3  # the adapters act
    for cls, name in [(StableDiffusionXLPipeline, KOHYA_FILE), (LDMPipeline, LORA_FILE), (LDMPipeline, KOHYA_FILE)]:
        pipe = cls.from_pretrained(xl_dir)
        pipe.load_lora_weights(str(folder), weight_name=name)  # diffusers maps kohya's SDXL names back
        assert np.abs(draw(pipe) - want).max() <= 2e-3, (cls.__name__, name)
    merged = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")  # merged at finetune.merge_scale = 1
    merged.scheduler = type(reference.scheduler).from_config(merged.scheduler.config)  # it saves sample.scheduler
    assert np.abs(draw(merged) - want).max() <= 2e-3


def test_a_v_prediction_zero_snr_derivative_keeps_its_schedule(tmp_path, tiny_vae_dir, mixed_dir):
    from diffusers import StableDiffusionXLPipeline

    from pipelines import LDMPipeline

    xl = sdxl_folder(tmp_path / "vpred", tiny_vae_dir, ["a red circle", "a blue square", "a green triangle"],
                     prediction_type="v_prediction", zero_snr=True)
    cfg = _cfg(tmp_path, xl, mixed_dir, "train.max_steps=2", "train.learning_rate=0.001")
    train(cfg)
    out = cfg.run_dir / "pipeline"
    schedule = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["prediction_type"] == "v_prediction" and schedule["rescale_betas_zero_snr"] is True
    draws = []
    for cls in (LDMPipeline, StableDiffusionXLPipeline):
        pipe = cls.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        draws.append(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.7,
                          generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert np.abs(draws[0] - draws[1]).max() <= 2e-3


def test_both_text_encoders_train_and_resume_exactly(tmp_path, xl_dir, mixed_dir):
    from diffusers import StableDiffusionXLPipeline

    from pipelines import LDMPipeline

    args = ["model.train_text_encoder=true", "data.caption_dropout=0.5", "train.learning_rate=0.001",
            "train.max_steps=4", "train.checkpoint_every=2", "data.random_flip=true"]
    full = _cfg(tmp_path, xl_dir, mixed_dir, "name=full", *args)
    train(full)
    out = full.run_dir / "pipeline"
    for part, name, changed in [("text_encoder", "model", True), ("text_encoder_2", "model", True),
                                ("vae", "diffusion_pytorch_model", False), ("unet", "diffusion_pytorch_model", True)]:
        a, b = load_file(xl_dir / part / f"{name}.safetensors"), load_file(out / part / f"{name}.safetensors")
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, part
    draws = []
    for cls in (LDMPipeline, StableDiffusionXLPipeline):
        pipe = cls.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        draws.append(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(0), output_type="np").images)
    assert np.abs(draws[0] - draws[1]).max() <= 2e-3
    resumed = _cfg(tmp_path, xl_dir, mixed_dir, "name=resumed", "train.resume=latest", *args)
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step-2", resumed.run_dir / "checkpoints" / "step-2")
    train(resumed)
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")]:
        a, b = (load_file(c.run_dir / "pipeline" / part / f"{name}.safetensors") for c in (full, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_lora_on_both_text_encoders_loads_in_diffusers_from_both_layouts(tmp_path, xl_dir, mixed_dir):
    from diffusers import StableDiffusionXLPipeline

    from ldm.methods.lora import KOHYA_FILE, LORA_FILE

    cfg = _cfg(tmp_path, xl_dir, mixed_dir, "finetune.method=lora", "finetune.lora_text_encoder=true",
               "finetune.lora_format=both", "finetune.lora_rank=4", "finetune.lora_alpha=8",
               "train.learning_rate=0.01", "train.max_steps=3")
    train(cfg)
    folder = cfg.run_dir / "lora"
    kohya = load_file(folder / KOHYA_FILE)
    assert {k.split("_text_model")[0] for k in kohya if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))

    def draw(name):
        pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir)
        pipe.set_progress_bar_config(disable=True)
        if name:
            pipe.load_lora_weights(str(folder), weight_name=name)
            for encoder in (pipe.text_encoder, pipe.text_encoder_2):
                assert any("lora" in n for n, _ in encoder.named_parameters())
        return pipe("a red circle", num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    want = draw(LORA_FILE)
    assert np.abs(draw(KOHYA_FILE) - want).max() <= 2e-3
    assert np.abs(draw(None) - want).max() > 1e-3


TOKEN = "<zap>"


@pytest.fixture(scope="module")
def zap_dir(tmp_path_factory, mixed_dir):
    """The mixed images with red called "<zap>" in their captions."""
    root = tmp_path_factory.mktemp("zap")
    shutil.copytree(mixed_dir, root, dirs_exist_ok=True)
    meta = root / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a red ", f"a {TOKEN} "))
    return root


def _embedding_rows(state: dict) -> torch.Tensor:
    return next(v for k, v in state.items() if k.endswith("token_embedding.weight"))


def test_textual_inversion_trains_both_encoders_rows_and_loads_in_diffusers(tmp_path, xl_dir, zap_dir):
    from diffusers import StableDiffusionXLPipeline

    from ldm.methods.textual_inversion import load_embedding
    from pipelines import LDMPipeline

    args = ["finetune.method=textual_inversion", f"finetune.placeholder_token={TOKEN}", "finetune.num_vectors=2",
            "finetune.initializer_token=blue", "train.learning_rate=0.05", "train.max_steps=4",
            "train.checkpoint_every=2", f"sample.prompts=['a {TOKEN} circle']"]
    full = _cfg(tmp_path, xl_dir, zap_dir, "name=full", *args)
    train(full)
    with pytest.raises(ValueError, match=r"initializer_token='blueish' is \d+ tokens for the first tokenizer "):
        train(_cfg(tmp_path, xl_dir, zap_dir, "name=bad", *args, "finetune.initializer_token=blueish"))
    file = full.run_dir / "textual_inversion" / "zap.safetensors"
    vectors = load_file(file)
    assert sorted(vectors) == ["clip_g", "clip_l"] and [v.shape for v in vectors.values()] == [(2, 32), (2, 32)]
    # the checkpoint: the U-Net and every old row of both tables are the pretrained ones; the new rows trained
    ckpt = full.run_dir / "checkpoints" / "step-4"
    unet = load_file(ckpt / "model.safetensors")
    pre = load_file(xl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == pre.keys() and all(torch.equal(unet[k], pre[k]) for k in pre)
    base = LDMPipeline.from_pretrained(xl_dir)
    for k, (key, part, tokenizer) in enumerate([("clip_l", "text_encoder", base.tokenizer),
                                                ("clip_g", "text_encoder_2", base.tokenizer_2)]):
        trained = load_file(ckpt / f"model_{k + 1}.safetensors")
        pretrained = load_file(xl_dir / part / "model.safetensors")
        rows, old = _embedding_rows(trained), _embedding_rows(pretrained)
        n = len(old)
        assert rows.shape == (n + 2, 32) and torch.equal(rows[:n], old), part
        assert all(torch.equal(trained[name], pretrained[name]) for name in pretrained
                   if not name.endswith("token_embedding.weight")), part
        blue = old[tokenizer.convert_tokens_to_ids("blue</w>")]
        assert (rows[n:] - blue).abs().amax(1).min() > 1e-3, part  # both vectors moved off the initializer
        torch.testing.assert_close(rows[n:], vectors[key], rtol=0, atol=0)
    # diffusers' two load_textual_inversion calls and ours draw the same, and the word acts
    theirs = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    theirs.load_textual_inversion(vectors["clip_l"], token=TOKEN, text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(vectors["clip_g"], token=TOKEN, text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    load_embedding(base, file)

    def draw(pipe, prompt=f"a {TOKEN} circle"):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    ours = draw(base)
    assert np.abs(draw(theirs) - ours).max() <= 2e-3
    assert np.abs(draw(base, "a blue circle") - ours).max() > 1e-3
    from ldm.generate import load_pipeline  # the command line takes the run's folder

    cli = load_pipeline(str(xl_dir), embeddings=[str(file.parent)])
    cli.scheduler = base.scheduler
    assert np.abs(draw(cli) - ours).max() <= 1e-5
    # resumed from step 2: the same vectors bit for bit
    resumed = _cfg(tmp_path, xl_dir, zap_dir, "name=resumed", "train.resume=latest", *args)
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step-2", resumed.run_dir / "checkpoints" / "step-2")
    train(resumed)
    again = load_file(resumed.run_dir / "textual_inversion" / "zap.safetensors")
    assert all(torch.equal(again[k], vectors[k]) for k in vectors)


def test_dreambooth_draws_class_images_with_the_sdxl_pipeline_and_adds_the_prior_loss(tmp_path, xl_dir, monkeypatch):

    import ldm.methods.dreambooth as dreambooth
    from ldm.engine.records import read_metrics
    from pipelines import LDMXLPipeline

    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(4):  # 40 wide, 48 high: their size conditions differ from the drawn class images' (32 x 32)
        arr = np.full((48, 40, 3), 90, np.uint8)
        arr[8 + i:20 + i, 10:22] = 255
        Image.fromarray(arr).save(subject / f"{i}.png")
    pipelines = []
    real_ensure = dreambooth.ensure_class_images

    def recording(factory, *args, **kwargs):
        return real_ensure(lambda: pipelines.append(factory()) or pipelines[-1], *args, **kwargs)

    monkeypatch.setattr(dreambooth, "ensure_class_images", recording)
    seen = record_added_conditions(monkeypatch)
    cfg = _cfg(tmp_path, xl_dir, tmp_path / "unused", f"dreambooth.instance_data={subject}",
               "dreambooth.instance_prompt=a photo of sks blob", "dreambooth.class_prompt=a red circle",
               f"dreambooth.class_data={tmp_path / 'cls'}", "dreambooth.num_class_images=4",
               "dreambooth.class_inference_steps=2", "dreambooth.prior_loss_weight=0.5", "train.batch_size=2",
               "data.caption_dropout=0.0", "train.max_steps=3", "train.log_every=1", "train.learning_rate=0.001")
    train(cfg)
    assert len(pipelines) == 1 and type(pipelines[0]) is LDMXLPipeline
    meta = [json.loads(line) for line in (tmp_path / "cls" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and {m["text"] for m in meta} == {"a red circle"}
    assert all(Image.open(tmp_path / "cls" / m["file_name"]).size == (32, 32) for m in meta)
    # every training forward: 2 subject rows, then 2 class rows, each with its prompt's pooled text and its
    # images' size conditions (the subject's 48 x 40 files, the class images' 32 x 32)
    assert len(seen) == 3
    for added in seen:
        pooled, ids = added["text_embeds"], added["time_ids"]
        assert pooled.shape == (4, 16) and ids.shape == (4, 6)
        assert torch.equal(pooled[0], pooled[1]) and torch.equal(pooled[2], pooled[3])
        assert not torch.equal(pooled[0], pooled[2])
        assert ids[:2, :2].tolist() == [[48, 40]] * 2 and ids[2:, :2].tolist() == [[32, 32]] * 2
        assert ids[:, 4:].tolist() == [[32, 32]] * 4
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "epoch" in r]
    assert rows and all(np.isfinite(r["prior_loss"]) and r["prior_loss"] > 0 for r in rows)
    assert (cfg.run_dir / "pipeline" / "text_encoder_2" / "model.safetensors").is_file()


def test_the_prior_loss_adds_the_class_part_at_its_weight_under_sdxl_conditions():
    """XLObjective: the loss is the subject part's mean plus prior_loss_weight times the class part's."""
    from ldm.data.batches import Plan
    from ldm.diffusion.gaussian import GaussianDiffusion, make_betas
    from ldm.trainer.config import DiffusionConfig
    from ldm.trainer.sdxl import XLObjective

    class VAEConfig:
        scaling_factor, shift_factor, latent_channels, block_out_channels = 1.0, None, 4, [8, 16, 16]

    class Text:
        @staticmethod
        def encode(captions, drop, device):
            return captions.float()[:, None, None].expand(-1, 1, 2), {"text_embeds": captions.float()[:, None]}

    seen = []

    def unet(x, t, encoder_hidden_states, added_cond_kwargs):
        seen.append(added_cond_kwargs)
        scale = 1 + added_cond_kwargs["time_ids"][:, :1, None, None] / 100 + encoder_hidden_states[:, :1, :1, None]
        return type("Out", (), {"sample": x * scale})

    objective = XLObjective(GaussianDiffusion(make_betas("linear", 100)), DiffusionConfig(), 0.0, Text(),
                            type("VAE", (), {"config": VAEConfig()})(), prior_loss_weight=0.5)
    parts = []
    for k, seed in enumerate((3, 4)):
        plan = Plan(list(range(2)), (32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                    torch.zeros(2, dtype=torch.long), draws_seed=seed)
        g = torch.Generator().manual_seed(seed)
        batch = {"mean": torch.randn(2, 4, 8, 8, generator=g), "std": torch.zeros(2, 4, 8, 8),
                 "captions": torch.tensor([k, k]), "time_ids": torch.full((2, 6), 10.0 * (k + 1))}
        parts.append((batch, objective.draw(plan), slice(0, 2)))
    terms, loss = objective(unet, parts, "cpu")
    assert seen[0]["time_ids"][:, 0].tolist() == [10, 10, 20, 20]  # the class part's conditions follow the subject's
    assert seen[0]["text_embeds"].flatten().tolist() == [0, 0, 1, 1]
    alone, _ = objective(unet, parts[:1], "cpu")
    torch.testing.assert_close(terms["loss"], alone["loss"])
    torch.testing.assert_close(loss, terms["loss"].mean() + 0.5 * terms["prior_loss"].mean())
    assert terms["prior_loss"].shape == (2,) and terms["prior_loss"].mean() > 0


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    """Images of several sizes (blocks on black), each with a <name>_mask.png equal to its red channel."""
    from ldm.data.masks import mask_path

    root = tmp_path_factory.mktemp("masked")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(16):
        w, h = SIZES[i % len(SIZES)]
        arr = np.zeros((h, w, 3), np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            arr[y:y + 8, x:x + 8] = rng.integers(30, 255, 3)
        Image.fromarray(arr).save(root / f"{i:03d}.png")
        Image.fromarray(arr[..., 0]).save(mask_path(root / f"{i:03d}.png"))
        rows.append({"file_name": f"{i:03d}.png", "text": ["a red circle", "a blue square"][i % 2]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("extra", [["data.bucketing=true", "data.random_flip=true"],
                                   ["data.random_crop=true", "data.center_crop=false", "data.random_flip=true"]],
                         ids=["cached-buckets-flips", "random-crops"])
def test_masks_follow_sdxl_batches_and_a_masked_run_trains(tmp_path, xl_dir, masked_dir, extra):
    from ldm.data.masks import MaskItems
    from ldm.trainer.train import build_run

    cfg = _cfg(tmp_path, xl_dir, masked_dir, "data.mask_source=file", "data.bucket_step=8", "train.max_steps=2",
               *extra)
    source = build_run(cfg).sources[0]
    d = cfg.data
    masks = MaskItems(source.split, d.resolution, d.image_column, d.center_crop, d.random_crop, "file")
    for step in range(3):
        plan = source.plan(step)
        batch = source.load(plan, slice(0, 4))
        assert batch["time_ids"].shape == (4, 6) and batch["time_ids"][:, 4:].tolist() == [list(plan.size)] * 4
        keys = list(zip(plan.items[:4], plan.flips[:4].tolist(), plan.crop_seeds[:4].tolist()))
        if "pixels" in batch:  # cut this step: the mask is the red channel of the very pixels
            assert batch["mask"].shape == (4, 1, *plan.size)
            torch.testing.assert_close(batch["mask"][:, 0] * 2 - 1, batch["pixels"][:, 0], atol=1.5 / 255, rtol=0)
        else:  # cached at latent size (factor 4), mirrored with its latents
            assert batch["mask"].shape == (4, 1, plan.size[0] // 4, plan.size[1] // 4)
            for k, (i, flip, _) in enumerate(keys):
                expected = torch.nn.functional.avg_pool2d(masks[(i, flip, 0)][None], 4)[0]
                torch.testing.assert_close(batch["mask"][k], expected, atol=1e-6, rtol=0)
    result = train(_cfg(tmp_path, xl_dir, masked_dir, "data.mask_source=file", "data.bucket_step=8",
                        "train.max_steps=2", "name=masked", *extra))
    assert np.isfinite(result["final_loss"])


def test_masked_out_latents_do_not_reach_the_gradients_under_sdxl_conditions():
    """XLObjective with a per-pixel denoiser that reads the pooled text and the size conditions: whatever the
    latents in the masked-out half, the gradients are the same."""
    from ldm.data.batches import Plan
    from ldm.diffusion.gaussian import GaussianDiffusion, make_betas
    from ldm.trainer.config import DiffusionConfig
    from ldm.trainer.sdxl import XLObjective

    class VAEConfig:
        scaling_factor, shift_factor, latent_channels, block_out_channels = 1.0, None, 4, [8, 16, 16]

    class Text:
        @staticmethod
        def encode(captions, drop, device):
            return torch.zeros(len(captions), 1, 1), {"text_embeds": captions.float()[:, None] + 1}

    class Pointwise(XLObjective):
        def network(self, unet, inputs):
            pooled, sizes = inputs.conditions["text_embeds"], inputs.conditions["time_ids"]
            scale = pooled[:, :, None, None] * (1 + sizes[:, :1, None, None] / 64)  # (b, 1, 1, 1): per row
            return lambda x, t: unet(x * scale)

    g = torch.Generator().manual_seed(1)
    mean = torch.randn(4, 4, 8, 8, generator=g)
    other = mean.clone()
    other[..., :4] = 5 * torch.randn(4, 4, 8, 4, generator=g)
    half = torch.ones(4, 1, 8, 8)
    half[..., :4] = 0

    def grads(latents, mask):
        torch.manual_seed(0)
        net = torch.nn.Conv2d(4, 4, 1)
        objective = Pointwise(GaussianDiffusion(make_betas("linear", 100)), DiffusionConfig(), 0.0, Text(),
                              type("VAE", (), {"config": VAEConfig()})())
        plan = Plan(list(range(4)), (32, 32), torch.arange(4), torch.zeros(4, dtype=torch.bool),
                    torch.zeros(4, dtype=torch.long), draws_seed=5)
        batch = {"mean": latents, "std": torch.full_like(latents, 0.1), "captions": torch.arange(4),
                 "time_ids": torch.tensor([[32.0, 48, 0, 8, 32, 32]] * 4) * torch.arange(1, 5)[:, None]}
        if mask is not None:
            batch["mask"] = mask
        _, loss = objective(net, [(batch, objective.draw(plan), slice(0, 4))], "cpu")
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    torch.testing.assert_close(grads(other, half), grads(mean, half), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grads(other, None), grads(mean, None), atol=1e-4)  # unmasked, the half counts


def test_pixels_cut_each_step_are_encoded_in_fp32_under_fp16_autocast(tiny_vae_dir):
    """SDXL's VAE overflows in fp16: XLObjective encodes per-step pixels with autocast off (the VAE's fp32), while
    the base objective (Stable Diffusion's, unchanged) encodes under the step's autocast."""
    from diffusers import AutoencoderKL

    from ldm.diffusion.gaussian import GaussianDiffusion, make_betas
    from ldm.models.vae import encode
    from ldm.trainer.config import DiffusionConfig
    from ldm.trainer.objective import LatentDiffusionObjective
    from ldm.trainer.sdxl import XLObjective

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    dtypes = []
    for module in (vae.encoder.conv_in, vae.encoder.conv_out, vae.quant_conv):
        module.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = encode(vae, pixels)
        seen = {}
        for cls in (XLObjective, LatentDiffusionObjective):
            objective = cls(GaussianDiffusion(make_betas("linear", 100)), DiffusionConfig(), 0.0, None, vae)
            dtypes.clear()
            with torch.autocast("cpu", dtype=torch.float16):
                mean, std = objective.encode_pixels(pixels)
            seen[cls] = set(dtypes)
            if cls is XLObjective:
                assert mean.dtype == std.dtype == torch.float32
                assert torch.equal(mean, want[0]) and torch.equal(std, want[1])
    assert seen[XLObjective] == {torch.float32}
    assert seen[LatentDiffusionObjective] == {torch.float16}


def test_an_sdxl_run_under_mixed_precision_encodes_its_random_crops_in_fp32(tmp_path, xl_dir, mixed_dir, monkeypatch):
    """On the CPU Accelerate's bf16 autocast stands for fp16's (which needs a GPU): the U-Net runs under it, the
    VAE encoder of each step's crops does not."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.autoencoders.vae import Encoder

    seen = {"vae": [], "unet": []}
    real_encoder, real_unet = Encoder.forward, UNet2DConditionModel.forward

    def encoder(self, sample, *args, **kwargs):
        out = real_encoder(self, sample, *args, **kwargs)
        seen["vae"].append((torch.is_autocast_enabled("cpu"), sample.dtype, out.dtype))
        return out

    def unet(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen["unet"].append(torch.is_autocast_enabled("cpu"))
        return real_unet(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "forward", encoder)
    monkeypatch.setattr(UNet2DConditionModel, "forward", unet)
    cfg = _cfg(tmp_path, xl_dir, mixed_dir, "train.mixed_precision=bf16", "data.random_crop=true",
               "data.center_crop=false", "train.max_steps=2", "data.cache_latents=true")
    result = train(cfg)
    assert np.isfinite(result["final_loss"])
    assert seen["unet"] == [True, True]  # the steps ran under autocast
    per_step = seen["vae"][-2:]  # validation's latents were cached before training, outside any autocast
    assert per_step == [(False, torch.float32, torch.float32)] * 2


def test_the_sdxl_dreambooth_preset_runs_at_tiny_sizes(tmp_path, xl_dir):
    text = (ROOT / "configs/ldm/dreambooth-sdxl.yaml").read_text()
    assert text.startswith("#") and "Sized for" in text
    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 32, 3), 60 + 100 * i, np.uint8)).save(subject / f"{i}.png")
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/dreambooth-sdxl.yaml", [
        f"output_dir={tmp_path}", f"model.pretrained={xl_dir}", f"dreambooth.instance_data={subject}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32", "train.mixed_precision=no",
        "finetune.base_dtype=fp32", "train.gradient_checkpointing=false", "train.max_steps=2",
        "dreambooth.num_class_images=2", "dreambooth.class_inference_steps=2", "sample.num_inference_steps=2",
        "sample.seeds=[0]", "train.tensorboard=false"])
    train(cfg)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        assert (cfg.run_dir / "lora" / name).is_file()
    assert len(list((cfg.run_dir / "class_images").glob("*.png"))) == 2


def test_sdxl_streams_shards_with_each_cuts_size_conditions_and_precomputed_latents_with_theirs(
        tmp_path, xl_dir, mixed_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    from ldm.data.stream import main as stream_main
    from ldm.precompute import precompute

    shards = tmp_path / "shards"
    stream_main(["pack", str(mixed_dir), str(shards), "--per-shard", "6"])
    seen, real = [], UNet2DConditionModel.forward

    def spy(self, sample, timestep, *args, added_cond_kwargs=None, **kwargs):
        if torch.is_grad_enabled():
            seen.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"].clone()))
        return real(self, sample, timestep, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    cfg = _cfg(tmp_path, xl_dir, str(shards), "data.bucketing=true", "data.bucket_step=8", "data.random_crop=true",
               "data.random_flip=true", "train.max_steps=4", "data.shuffle_buffer=8")
    train(cfg)
    originals, factor = {(h, w) for w, h in SIZES}, 4  # the tiny VAE's
    assert len(seen) == 4 and {s[0] for s in seen} != {(8, 8)}  # several buckets
    for latent_size, time_ids in seen:
        for h, w, top, left, th, tw in time_ids.int().tolist():
            assert (h, w) in originals and (th, tw) == (latent_size[0] * factor, latent_size[1] * factor)
            assert 0 <= top <= h - th + 8 and 0 <= left <= w - tw + 8  # a crop inside the resized image

    seen.clear()
    out = tmp_path / "latents"
    counts = precompute(_cfg(tmp_path, xl_dir, str(shards)), out)
    assert counts["samples"] == 24 and not counts["text_embeddings"]  # two encoders: they run every step
    run = _cfg(tmp_path, xl_dir, str(out), "name=xl_latents", "train.max_steps=2")
    train(run)
    assert len(seen) == 2
    assert all((h, w) in originals and (th, tw) == (32, 32) for _, ids in seen for h, w, _, _, th, tw in ids.tolist())

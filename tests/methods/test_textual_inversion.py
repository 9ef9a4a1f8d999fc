"""Textual inversion on a tiny Stable Diffusion folder: only the placeholder's embedding rows change; the
exported files (diffusers' and AUTOMATIC1111's layouts) load in diffusers' StableDiffusionPipeline and in
LDMPipeline and draw the same images; multi-vector placeholders are tokenised alike in training and sampling."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_models import sd_folder, tiny_vae

from ldm.data.builtin import generate_shapes
from ldm.engine.config import load_config
from ldm.methods.textual_inversion import EMBEDS_FILE
from ldm.models.text import tokenize
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train
from pipelines import LDMPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "<zap>"
PROMPT = f"a {TOKEN} circle at the top left"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shapes whose captions call red "<zap>", and a tiny SD folder whose tokenizer knows the other words."""
    import datasets

    root = tmp_path_factory.mktemp("ti")
    data = generate_shapes(root / "shapes", num_images=48, seed=0)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    captions = list(datasets.load_dataset("imagefolder", data_dir=str(data), split="train")["text"])
    for r in rows:
        r["text"] = r["text"].replace(" red ", f" {TOKEN} ")
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data": data, "sd": sd_folder(root / "sd", tiny_vae(root / "vae"), captions)}


def _cfg(tmp_path, base, *extra):
    return load_config(LDMConfig, "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"data.dataset={base['data']}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.pretrained={base['sd']}", "finetune.method=textual_inversion", f"finetune.placeholder_token={TOKEN}",
        "finetune.initializer_token=blue", "train.max_steps=6", "train.learning_rate=0.05",
        "train.tensorboard=false", "sample.seeds=[0]", "sample.num_inference_steps=2", f"sample.prompts=['{PROMPT}']",
        *extra])


def _images(pipe, prompt=PROMPT):
    pipe.set_progress_bar_config(disable=True)
    return pipe([prompt], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_only_the_new_rows_train_and_both_layouts_load_in_diffusers_and_ours(tmp_path, base):
    cfg = _cfg(tmp_path, base, "finetune.num_vectors=2", "train.checkpoint_every=6")
    train(cfg)
    out = cfg.run_dir / "textual_inversion"
    learned = load_file(out / EMBEDS_FILE)
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, 32)
    a1111 = load_file(out / "zap.safetensors")
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], learned[TOKEN])
    from safetensors import safe_open

    with safe_open(str(out / "zap.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["name"] == TOKEN and meta["modelspec.architecture"] == "stable-diffusion-v1-textual-inversion"
    assert meta["modelspec.trigger_phrase"] == TOKEN and meta["ss_steps"] == str(cfg.train.max_steps)

    # The checkpoint: U-Net and every old embedding row bit for bit the pretrained ones; the new rows moved
    # away from the initializer's row.
    ckpt = cfg.run_dir / "checkpoints" / "step-6"
    unet = load_file(ckpt / "model.safetensors")
    pre_unet = load_file(base["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == pre_unet.keys() and all(torch.equal(unet[k], pre_unet[k]) for k in unet)
    te = load_file(ckpt / "model_1.safetensors")
    pre_te = load_file(base["sd"] / "text_encoder" / "model.safetensors")
    key = "embeddings.token_embedding.weight"
    n_old = pre_te[key].shape[0]
    assert te[key].shape[0] == n_old + 2
    assert torch.equal(te[key][:n_old], pre_te[key])
    assert all(torch.equal(te[k], pre_te[k]) for k in pre_te if k != key)
    blue = LDMPipeline.from_pretrained(base["sd"]).tokenizer.convert_tokens_to_ids("blue</w>")
    assert (te[key][n_old:] - pre_te[key][blue]).abs().amax(1).min() > 1e-3  # both vectors trained
    assert torch.allclose(te[key][n_old:], learned[TOKEN])

    # Loaded by diffusers and by ours, from either file: the same images, which differ from the base's.
    theirs = StableDiffusionPipeline.from_pretrained(base["sd"])
    theirs.load_textual_inversion(str(out / EMBEDS_FILE))
    ours = LDMPipeline.from_pretrained(base["sd"])
    ours.load_textual_inversion(str(out / EMBEDS_FILE))
    from_a1111 = LDMPipeline.from_pretrained(base["sd"])
    from_a1111.load_textual_inversion(str(out / "zap.safetensors"), token=TOKEN)
    a, b, c = _images(theirs), _images(ours), _images(from_a1111)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(c, b, atol=1e-5)
    assert np.abs(b - _images(ours, "a blue circle at the top left")).max() > 1e-3
    # the command line loads either file (AUTOMATIC1111's by the name in its metadata) and draws with it
    from ldm.generate import load_pipeline, main

    for path in (out, out / "zap.safetensors"):
        cli = load_pipeline(str(base["sd"]), scheduler="ddim", embeddings=[str(path)])
        cli.scheduler = ours.scheduler
        np.testing.assert_allclose(_images(cli), b, atol=1e-5)
    main(["--pipeline", str(base["sd"]), "--embedding", str(out / "zap.safetensors"), PROMPT, "--num-images", "1",
          "--steps", "2", "--out", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").is_file()
    # training's token ids of a caption with the placeholder are the pipeline's (both vectors, in order)
    ids = tokenize(ours.tokenizer, [PROMPT])[0].tolist()
    pipe_ids = ours.tokenizer(ours.maybe_convert_prompt(PROMPT, ours.tokenizer)).input_ids
    assert ids[:len(pipe_ids)] == pipe_ids
    assert ours.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == [i for i in ids if i >= n_old]


def test_textual_inversion_bad_settings(tmp_path, base):
    with pytest.raises(ValueError, match="initializer_token"):
        train(_cfg(tmp_path, base, "finetune.initializer_token=null"))
    with pytest.raises(ValueError, match="placeholder_token"):
        train(_cfg(tmp_path, base, "finetune.placeholder_token='two words'"))
    with pytest.raises(ValueError, match="train.ema_decay"):
        train(_cfg(tmp_path, base, "train.ema_decay=0.99"))
    with pytest.raises(ValueError, match="initializer_token='blueish' is 6 tokens for this model's tokenizer"):
        train(_cfg(tmp_path, base, "finetune.initializer_token=blueish", "name=a"))
    words = tmp_path / "words"  # captions that name the concept with a word the model knows
    import shutil

    shutil.copytree(base["data"], words)
    (words / "metadata.jsonl").write_text((words / "metadata.jsonl").read_text().replace(TOKEN, "circle"))
    with pytest.raises(ValueError, match="already in the vocabulary"):
        train(_cfg(tmp_path, base, "finetune.placeholder_token=circle", "name=b", f"data.dataset={words}"))
    with pytest.raises(ValueError, match="no caption names finetune.placeholder_token='<other>'"):
        train(_cfg(tmp_path, base, "finetune.placeholder_token=<other>", "name=c"))


def test_textual_inversion_on_uncaptioned_photos_through_dreambooth_instance_data(tmp_path, base):
    """A folder of images without captions, every one trained under the instance prompt naming the placeholder."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        arr = np.full((32, 32, 3), 90, np.uint8)
        arr[8 + i:20 + i, 10:22] = 255
        Image.fromarray(arr).save(photos / f"{i}.png")
    cfg = _cfg(tmp_path, base, f"dreambooth.instance_data={photos}", f"dreambooth.instance_prompt=a {TOKEN} blob",
               "train.batch_size=4")
    train(cfg)
    learned = load_file(cfg.run_dir / "textual_inversion" / EMBEDS_FILE)[TOKEN]
    blue = LDMPipeline.from_pretrained(base["sd"])
    row = blue.text_encoder.get_input_embeddings().weight[blue.tokenizer.convert_tokens_to_ids("blue</w>")]
    assert (learned[0] - row).abs().max() > 1e-3  # it trained from the initializer


def test_an_embedding_under_an_ordinary_word_is_refused_not_loaded(tmp_path, base):
    from safetensors.torch import save_file

    from ldm.methods.textual_inversion import load_embedding

    pipe = LDMPipeline.from_pretrained(base["sd"])
    assert pipe.tokenizer.tokenize("red") == ["red</w>"]  # a word of this tokenizer
    save_file({"emb_params": torch.zeros(1, 32)}, str(tmp_path / "red.safetensors"))  # AUTOMATIC1111's layout
    save_file({"red": torch.zeros(1, 32)}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers' layout
    for path in (tmp_path / "red.safetensors", tmp_path / "learned_embeds.safetensors"):
        with pytest.raises(ValueError, match="under 'red', a word .* already keeps whole"):
            load_embedding(pipe, path)
    assert "red" not in pipe.tokenizer.get_vocab()  # nothing was added

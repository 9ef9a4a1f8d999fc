"""A Stable Diffusion XL-architecture model trained from scratch (``model.family=sdxl``): two new text encoders over
the learned tokenizer, a ``text_time`` U-Net, crops from ``data.crop_scale`` recorded in the time_ids; the export
draws in diffusers' StableDiffusionXLPipeline as in ours, resume is exact, and the crop condition reaches scoring
(`ldm.evaluate --crop`) and the crop demonstration."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import record_added_conditions, sdxl_folder

from ldm.data.builtin import draw_shape
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig, check_config
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """24 drawings of the built-in kind with their captions."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for i, (colour, shape, position) in enumerate([(c, s, p) for c in ("red", "blue") for s in ("circle", "square")
                                                   for p in ("top left", "center", "bottom right")] * 2):
        draw_shape(colour, shape, position, 0.375, (0.0, 0.0)).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"a {colour} {shape} at the {position}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(tmp_path, data, *extra):
    return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", "model.family=sdxl", f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
        "model.unet.addition_time_embed_dim=8", "data.random_crop=true", "data.crop_scale=1.25",
        "sample.seeds=[0]", "sample.num_inference_steps=2", "train.tensorboard=false", "train.batch_size=4",
        "data.validation_num_images=4", "train.learning_rate=0.001", "data.caption_dropout=0.5", *extra])


def test_a_new_sdxl_model_trains_and_diffusers_draws_its_export(tmp_path, shapes_dir, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from pipelines import LDMPipeline

    seen = record_added_conditions(monkeypatch)
    cfg = _cfg(tmp_path, shapes_dir, "train.max_steps=4")
    train(cfg)
    monkeypatch.undo()
    # 32 px drawings resized to 40, cut to 32 at offsets 0..8
    rows = torch.cat([s["time_ids"] for s in seen])
    assert (rows[:, [0, 1, 4, 5]] == 32).all() and rows[:, 2:4].min() >= 0 and rows[:, 2:4].max() <= 8
    assert len({tuple(r) for r in rows[:, 2:4].tolist()}) > 4
    out = cfg.run_dir / "pipeline"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 64
    assert unet["projection_class_embeddings_input_dim"] == 32 + 6 * 8
    assert json.loads((out / "text_encoder_2" / "config.json").read_text())["architectures"] == [
        "CLIPTextModelWithProjection"]
    draws = []
    for cls in (LDMPipeline, StableDiffusionXLPipeline):
        pipe = cls.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        draws.append(pipe(["a red circle at the center", "a blue square at the top left"], num_inference_steps=3,
                          guidance_scale=3.0, crops_coords_top_left=(4, 4), negative_prompt=["a blue square", ""],
                          generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images)
    assert np.abs(draws[0] - draws[1]).max() <= 2e-3


def test_a_new_sdxl_model_resumes_exactly(tmp_path, shapes_dir):
    args = ["train.max_steps=4", "train.checkpoint_every=2", "data.random_flip=true"]
    full = _cfg(tmp_path, shapes_dir, "name=full", *args)
    train(full)
    resumed = _cfg(tmp_path, shapes_dir, "name=resumed", "train.resume=latest", *args)
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step-2", resumed.run_dir / "checkpoints" / "step-2")
    train(resumed)
    for part, name in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")]:
        a, b = (load_file(c.run_dir / "pipeline" / part / f"{name}.safetensors") for c in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_model_family_must_agree_with_the_pretrained_model(tmp_path, tiny_vae_dir):
    xl = sdxl_folder(tmp_path / "xl", tiny_vae_dir, ["a red circle"])
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [f"output_dir={tmp_path}", f"model.pretrained={xl}",
                                                                  "model.family=sd"])
    with pytest.raises(ValueError, match=r"^model.family=sd but model.pretrained=.* holds a sdxl model"):
        check_config(cfg)
    with pytest.raises(ValueError, match=r"^data.crop_scale="):
        check_config(load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", ["data.crop_scale=0.5"]))


def test_crop_conditions_reach_scoring_and_only_models_that_take_them(tmp_path, shapes_dir):
    from ldm.eval.scoring import evaluate
    from pipelines import LDMPipeline

    cfg = _cfg(tmp_path, shapes_dir, "train.max_steps=1", "train.validate_every=0")
    train(cfg)
    pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    result = evaluate(pipe, "shapes", num_images=32, num_inference_steps=2, guidance_scale=1.0,
                      conditions={"crops_coords_top_left": (4, 4)})
    assert result["conditions"] == {"crops_coords_top_left": (4, 4)} and result["num_images"] == 32
    from ldm.eval.likelihood import nll  # the bound takes the family's conditioning too

    bound = nll(pipe, "shapes", num_images=4, stride=10)
    assert np.isfinite(bound["nll_bpd"]) and bound["num_images"] == 4
    sd = LDMPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                     scheduler=pipe.scheduler)
    with pytest.raises(ValueError, match=r"LDMPipeline takes no \['crops_coords_top_left'\]"):
        evaluate(sd, "shapes", num_images=16, conditions={"crops_coords_top_left": (4, 4)})


def test_the_crop_demo_measures_where_the_shape_lands():
    from demos.crop_demo import measure, predicted
    from ldm.eval.scorers import blob_centroid

    assert predicted((0, 0), 40, 32) == (20, 20) and predicted((8, 0), 40, 32) == (20, 12)
    with pytest.raises(ValueError, match="outside the 40 px image"):
        predicted((9, 0), 40, 32)
    big = draw_shape("red", "circle", "center", 0.3, (0.0, 0.0), resolution=40)
    drawn = {c: [big.crop((c[1], c[0], c[1] + 32, c[0] + 32))] for c in ((0, 0), (4, 4), (8, 0))}
    rows = measure(drawn, 40, 32)
    for row in rows:  # a drawing cut as the data path cuts lands where predicted
        assert np.allclose(row["centroid_xy"], row["predicted_xy"], atol=0.6), row
    assert np.allclose(rows[2]["shift_xy"], [0, -8], atol=0.6) and rows[2]["predicted_shift_xy"] == [0, -8]
    assert blob_centroid(Image.new("RGB", (32, 32))) is None

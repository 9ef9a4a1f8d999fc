"""The training engine's options on tiny models: bucketing, list captions, other sources, the text-embedding
cache, periodic validation with sample grids and TensorBoard, fine-tuning a Stable Diffusion folder; two
processes (gloo) against one."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import sd_folder

from ldm.engine.config import load_config
from ldm.engine.records import read_metrics
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, vae, data, *extra):
    return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"model.vae={vae}", f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
        "sample.seeds=[0]", "sample.num_inference_steps=2", *extra])


def _val(cfg):
    return [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_mse" in r]


@pytest.mark.parametrize("extra", [
    ["diffusion.prediction_type=sample", "diffusion.offset_noise=0.1", "diffusion.timestep_sampling=logit_normal"],
    ["train.mixed_precision=bf16", "data.random_flip=true", "data.random_crop=true"],
])
def test_other_options_train(tmp_path, tiny_vae_dir, data_dir, extra):
    """Options whose effect is tested elsewhere (test_objective.py) run end to end and give finite losses."""
    cfg = _cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=3", "train.log_every=1", *extra)
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "epoch" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    if "data.random_crop=true" in extra:  # a new crop every step: only the validation images are cached
        assert len([p for p in (tmp_path / "cache").iterdir() if (p / "groups.npy").exists()]) == 1


def _mixed_aspect_folder(root: Path) -> Path:
    """Wide, tall and square images with two captions each."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        w, h = [(48, 24), (24, 48), (32, 32)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": [f"image {i % 3}", f"picture {i % 3}"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bucketing_and_list_captions(tmp_path, tiny_vae_dir):
    data = _mixed_aspect_folder(tmp_path / "mixed")
    cfg = _cfg(tmp_path, tiny_vae_dir, data, "train.max_steps=6", "train.batch_size=8", "data.bucketing=true",
               "data.bucket_step=8", "data.bucket_max_ratio=2.0", "data.random_flip=true",
               "sample.prompts=[image 0]")
    result = train(cfg)
    # Every bucket holds at least a batch of 8 images (16 each): none is left out.
    assert "images_never_seen" not in result
    # One latent array per bucket (and per orientation), each holding only its bucket's latent size.
    folders = [p for p in (tmp_path / "cache").iterdir() if (p / "groups.npy").exists()]
    shapes = {}
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        if meta["flips"]:  # the training cache (the validation one is square and unflipped)
            shapes = {p.stem: np.load(p, mmap_mode="r").shape for p in folder.glob("mean*_*.npy")}
    # 48x24 -> bucket 24x40, 24x48 -> 40x24, 32x32 -> 32x32 (h x w), latents a quarter of that.
    assert {s[2:] for s in shapes.values()} == {(6, 10), (10, 6), (8, 8)}, shapes
    assert any(k.startswith("mean_flip_") for k in shapes)
    rows = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "epoch" in r]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_frozen_text_encoder_uses_the_embedding_cache_and_other_sources(tmp_path, tiny_vae_dir, data_dir):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    ds.to_parquet(str(tmp_path / "train.parquet"))
    cfg = _cfg(tmp_path, tiny_vae_dir, tmp_path / "train.parquet", "train.max_steps=4",
               "model.train_text_encoder=false", "data.validation_fraction=0.25")
    result = train(cfg)
    text = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("text-")]
    assert len(text) == 1
    embeds = np.load(text[0] / "embeds.npy", mmap_mode="r")
    assert embeds.shape[0] == 72  # 96 images minus the 25% held out, one caption each
    # The cached embeddings are the exported (frozen) encoder's outputs.
    from transformers import CLIPTextModel, CLIPTokenizer

    te = CLIPTextModel.from_pretrained(cfg.run_dir / "pipeline" / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(cfg.run_dir / "pipeline" / "tokenizer")
    first = json.loads((text[0] / "meta.json").read_text())
    assert first["num_captions"] == 72
    ids = tok(["a red circle at the top left"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = te(ids)[0][0].numpy()
    assert any(np.allclose(e, ref, atol=1e-5) for e in embeds), "no cached row equals the encoder's output"
    assert "held-out" not in str(result)  # the summary is printed; the result holds numbers only
    assert [r["step"] for r in _val(cfg)] == [0, 4]


def test_periodic_validation_writes_grids_and_tensorboard(tmp_path, tiny_vae_dir, data_dir):
    cfg = _cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=6", "train.validate_every=3")
    train(cfg)
    assert [r["step"] for r in _val(cfg)] == [0, 3, 6]
    assert (cfg.run_dir / "samples" / "step-3.png").exists() and (cfg.run_dir / "samples" / "step-6.png").exists()
    assert list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    acc.Reload()
    assert {"loss", "val_mse"} <= set(acc.Tags()["scalars"]) and "samples" in acc.Tags()["images"]


def test_builtin_scores_on_a_trained_pipeline(tmp_path, tiny_vae_dir, data_dir):
    from ldm.trainer.validation import builtin_scores
    from pipelines import LDMPipeline

    cfg = _cfg(tmp_path, tiny_vae_dir, data_dir, "train.max_steps=1")
    train(cfg)
    pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    scores = builtin_scores(pipe, "shapes", 16, num_inference_steps=2, guidance_scale=3.0)
    assert set(scores) == {"score_colour_accuracy", "score_shape_accuracy", "score_position_accuracy",
                           "score_all_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def _unet(run_dir):
    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def _initial_unet(cfg):
    """The U-Net a run of ``cfg`` starts from: the same seed, then the same building order."""
    from accelerate.utils import set_seed

    from ldm.data.splits import load_splits
    from ldm.models.components import build_components

    set_seed(cfg.train.seed)
    return build_components(cfg, load_splits(cfg)[0].captions).unet.state_dict()


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares 2 gloo CPU processes with 1 CPU process; a GPU "
                    "host would put the single process on the GPU")
def test_two_processes_match_one(tmp_path, tiny_vae_dir, data_dir):
    """The same global batch on 2 gloo processes (1 image of every 2 each) or 1 process reaches the same
    weights within float tolerance; the 2-process checkpoint resumes in 1 process to the same place."""
    common = [f"output_dir={tmp_path}", f"model.vae={tiny_vae_dir}", f"data.dataset={data_dir}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6", "train.checkpoint_every=3",
              "train.tensorboard=false", "train.log_every=1", "sample.seeds=[0]", "sample.num_inference_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_cpu_threads_per_process", "1",
           "--main_process_port", "29517", str(ROOT / "train_ldm.py"),
           "--config", str(ROOT / "configs/ldm/tiny.yaml"), "name=two", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"num_processes\s+2", proc.stdout), "the config must start two processes"
    # The same 2 processes as 2 machines of 1 process each (machine ranks 0 and 1 meeting on 127.0.0.1 over gloo,
    # as docs/training.md launches several machines): the same weights, bit for bit, from the cache the first
    # run built on the shared disk.
    port = cmd.index("--main_process_port")
    nodes = [subprocess.Popen([*cmd[:port], "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                               "--main_process_ip", "127.0.0.1", "--main_process_port", "29518", *cmd[port + 2:],
                               "name=nodes"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    nodes_unet, two_unet = _unet(tmp_path / "nodes"), _unet(tmp_path / "two")
    assert all(torch.equal(nodes_unet[k], two_unet[k]) for k in two_unet)
    one = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", ["name=one", *common,
                                                                  f"data.cache_dir={tmp_path / 'cache1'}"])
    train(one)
    # Two processes each encoded their share of the images into one cache: the same bytes as one process's.
    two_caches = sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert [p.name for p in two_caches] == sorted(p.name for p in (tmp_path / "cache1").iterdir())
    for folder in two_caches:
        for array in folder.glob("*.npy"):
            assert np.array_equal(np.load(array), np.load(tmp_path / "cache1" / folder.name / array.name)), array
    w0, a, b = _initial_unet(one), _unet(tmp_path / "two"), _unet(one.run_dir)

    def rel(x, y):  # distance between two end points relative to how far training moved the weights
        num = sum(((x[k] - y[k]) ** 2).sum() for k in x) ** 0.5
        return float(num / sum(((y[k] - w0[k]) ** 2).sum() for k in y) ** 0.5)

    assert rel(a, b) < 0.02, rel(a, b)
    # Logged losses are means over the global batch: the first step (identical weights) agrees closely.
    first = [[r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r.get("step") == 1 and "epoch" in r][0]
             for name in ("two", "one")]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    # The final row says how the weights were held: whole on each process (DDP), or in one process.
    last = {name: read_metrics(tmp_path / name / "metrics.jsonl")[-1] for name in ("two", "one", "nodes")}
    assert [last[n]["sharding"] for n in ("two", "one", "nodes")] == ["ddp", "none", "ddp"]
    assert last["two"]["params_per_process"] == last["two"]["params_total"] == last["one"]["params_total"] > 10**5
    # Resume the 2-process run's step-3 checkpoint in one process: the same end point again.
    resumed = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml",
                          ["name=resumed", *common, f"train.resume={tmp_path / 'two' / 'checkpoints' / 'step-3'}"])
    train(resumed)
    assert rel(_unet(resumed.run_dir), b) < 0.02


@pytest.mark.parametrize("train_te", [False, True])
def test_fine_tune_a_stable_diffusion_folder(tmp_path, tiny_vae_dir, data_dir, train_te):
    import datasets
    from diffusers import StableDiffusionPipeline

    captions = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")["text"]
    base = sd_folder(tmp_path / "sd", tiny_vae_dir, captions)
    cfg = _cfg(tmp_path, "builtin", data_dir, "train.max_steps=4", f"model.pretrained={base}",
               f"model.train_text_encoder={str(train_te).lower()}", "train.learning_rate=0.001")
    train(cfg)
    out = cfg.run_dir / "pipeline"
    # The schedule and prediction type, tokenizer and VAE are the pretrained folder's.
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    from transformers import CLIPTokenizer

    tok_a, tok_b = (CLIPTokenizer.from_pretrained(p / "tokenizer") for p in (base, out))
    assert tok_a.get_vocab() == tok_b.get_vocab() and tok_a(captions[:3]).input_ids == tok_b(captions[:3]).input_ids
    vae_a = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    vae_b = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    # The U-Net trained; the text encoder trained only when asked.
    unet_a = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    unet_b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    te_a, te_b = (load_file(p / "text_encoder" / "model.safetensors") for p in (base, out))
    assert any(not torch.equal(te_a[k], te_b[k]) for k in te_a) == train_te
    sd = StableDiffusionPipeline.from_pretrained(out)
    assert sd.unet.config.block_out_channels == [32, 32]


def test_adamw8bit_comes_from_bitsandbytes(monkeypatch):
    import types

    from ldm.trainer.config import TrainConfig
    from ldm.trainer.optimizers import make_optimizer

    params = [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        make_optimizer(params, TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))

    class AdamW8bit(torch.optim.AdamW):
        pass

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    opt = make_optimizer(params, TrainConfig(optimizer="adamw8bit", adam_beta1=0.8), torch.device("cpu"))
    assert isinstance(opt, AdamW8bit) and opt.defaults["betas"] == (0.8, 0.999)
    with pytest.raises(ValueError, match="train.optimizer='sgd' is not one of"):
        load_config(LDMConfig, None, ["train.optimizer=sgd"])

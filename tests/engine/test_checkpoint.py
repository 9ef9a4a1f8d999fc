"""Checkpoints: atomic saves with keep_last, resume that reaches the uninterrupted run's weights bit for
bit on CPU (mid-epoch, with gradient accumulation, with EMA), and a failed save that loses nothing."""

import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ldm.data.batches import GlobalBatchSampler, step_batches
from ldm.data.builtin import generate_shapes
from ldm.engine.checkpoint import CheckpointManager, list_checkpoints, read_train_state, resolve_resume
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_images=88, seed=0)


def _cfg(tmp_path, data, name, *extra):
    return load_config(LDMConfig, "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"name={name}", f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=9", "train.checkpoint_every=4", "train.keep_last=3", "train.log_every=1",
        "sample.seeds=[0]", "sample.num_inference_steps=2", "train.tensorboard=false", *extra])


def _weights(run_dir):
    return {part: load_file(run_dir / "pipeline" / part / "diffusion_pytorch_model.safetensors"
                            if part == "unet" else run_dir / "pipeline" / part / "model.safetensors")
            for part in ("unet", "text_encoder")}


@pytest.mark.parametrize("extra", [[], ["train.gradient_accumulation_steps=2", "train.ema_decay=0.9",
                                        "data.random_flip=true"],
                                   ["train.optimizer=adafactor"], ["train.optimizer=prodigy", "train.learning_rate=1.0"],
                                   ["diffusion.input_perturbation=0.1", "diffusion.debiased_estimation=true",
                                    "diffusion.min_timestep=10", "diffusion.max_timestep=90",
                                    "diffusion.distance=huber", "diffusion.timestep_sampling=importance"]])
def test_resume_is_bitwise_identical(tmp_path, data_dir, extra, monkeypatch):
    # 88 images in batches of 16: 5 batches per epoch, so step 4 is mid-epoch 0 and step 8 mid-epoch 1.
    full = _cfg(tmp_path, data_dir, "full", *extra)
    train(full)
    assert [p.name for p in list_checkpoints(full.run_dir / "checkpoints")] == ["step-4", "step-8", "step-9"]
    state = read_train_state(full.run_dir / "checkpoints" / "step-4")
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["batches_per_epoch"]) == (4, 0, 4, 5)

    # A second run that starts from the first one's step-4 checkpoint (as if stopped there).
    resumed = _cfg(tmp_path, data_dir, "resumed", *extra, "train.resume=latest")
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full.run_dir / "checkpoints" / "step-4", resumed.run_dir / "checkpoints" / "step-4")
    import ldm.models.components

    def no_new_tokenizer(*args, **kwargs):
        raise AssertionError("a resumed run must read the checkpoint's tokenizer, not learn another")

    monkeypatch.setattr(ldm.models.components, "build_tokenizer", no_new_tokenizer)
    train(resumed)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # The resumed run's log continues from step 4: the rows of steps 5..9 match the uninterrupted run.
    from ldm.engine.records import read_metrics
    la = {r["step"]: r["loss"] for r in read_metrics(full.run_dir / "metrics.jsonl") if "epoch" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir / "metrics.jsonl") if "epoch" in r}
    assert sorted(lb) == [5, 6, 7, 8, 9] and all(la[s] == lb[s] for s in lb)


def test_resume_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "step-3").mkdir()  # a folder without train_state.json is not a checkpoint
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step-3"), tmp_path)
    assert resolve_resume("latest", tmp_path) is None  # nothing yet: a fresh start
    assert resolve_resume(None, tmp_path) is None


def _tiny_state():
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _step(model, opt):
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_keep_last_prunes_only_after_a_complete_save(tmp_path):
    acc, model, opt = _tiny_state()
    ckpt = CheckpointManager(acc, tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _step(model, opt)
        ckpt.save(step, 4, "name: x\n")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(acc, tmp_path, keep_last=0)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    acc, model, opt = _tiny_state()
    ckpt = CheckpointManager(acc, tmp_path, keep_last=1)
    _step(model, opt)
    ckpt.save(1, 4, "name: x\n", note="good")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)

    def half_save(output_dir, **kwargs):  # writes part of the state, then the disk fills up
        (tmp_path / ".tmp-step-2" / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(acc, "save_state", half_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.save(2, 4, "name: x\n")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # the partial folder is gone
    # The surviving checkpoint loads and restores the step-1 weights.
    assert ckpt.load(tmp_path / "step-1", 4) == 1
    assert read_train_state(tmp_path / "step-1") == {"step": 1, "epoch": 0, "batch_in_epoch": 1, "batches_per_epoch": 4,
                                                     "config": "name: x\n", "note": "good"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


def test_step_batches_resume_mid_epoch():
    sampler = GlobalBatchSampler(None, 10, 3, seed=0)  # 3 batches per epoch
    whole = list(step_batches(sampler, 0, 8))
    assert [s for s, _, _ in whole] == list(range(8))
    assert [e for _, e, _ in whole] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert list(step_batches(sampler, 4, 8)) == whole[4:]

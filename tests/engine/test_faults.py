"""Faults: bad data is skipped and counted, images mean what they show, divergence stops before anything bad is
saved, a signal leaves a checkpoint to resume from bit for bit, checkpoints cannot run code, runs do not mix,
errors at the command line are one clear message, and a failing process does not leave the other hanging."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.data.images import ImageTransform, to_rgb
from ldm.data.sources import load_source
from ldm.engine.checkpoint import list_checkpoints
from ldm.engine.errors import NonFinite
from ldm.engine.records import read_metrics
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _unet(run_dir):
    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


# ---- bad data ----------------------------------------------------------------------------------

def _folder_with_bad_images(root: Path, data_dir: Path) -> Path:
    import shutil

    shutil.copytree(data_dir, root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    good = (root / sorted(p.name for p in root.glob("*.png"))[0]).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "empty.png").write_bytes(b"")
    with open(root / "metadata.jsonl", "a") as f:
        for name in ("corrupt.png", "truncated.png", "empty.png"):
            f.write(json.dumps({"file_name": name, "text": "a red circle at the top left"}) + "\n")
    return root


def test_bad_images_are_skipped_named_and_counted(tmp_path, tiny_cfg, data_dir):
    folder = _folder_with_bad_images(tmp_path / "mixed", data_dir)
    cfg = tiny_cfg("train.max_steps=2", "data.max_bad_fraction=0.05", data=folder)
    result = train(cfg)
    assert result["bad_images_skipped"] == 3
    report = [json.loads(x) for x in (cfg.run_dir / "bad_images.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in report) == ["corrupt.png", "empty.png", "truncated.png"]
    assert all(r["error"] for r in report)
    # More than the allowed fraction: one error that names every bad file.
    with pytest.raises(ValueError, match="3 of 99 images") as info:
        train(tiny_cfg("train.max_steps=1", "name=strict", data=folder))
    assert all(n in str(info.value) for n in ("corrupt.png", "truncated.png", "empty.png"))


def test_metadata_errors_name_file_and_line_and_mixed_captions_load(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not a JSON object"):
        load_source(str(folder))
    (folder / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        load_source(str(folder))
    rows = [{"file_name": "0.png", "text": "one"}, {"file_name": "1.png", "text": ["two", "deux"]},
            {"file_name": "2.png", "text": "three"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_source(str(folder))
    assert ds["text"] == [["one"], ["two", "deux"], ["three"]] and ds[2]["image"].getpixel((0, 0)) == (100, 0, 0)


# ---- image modes -------------------------------------------------------------------------------

def _value(image: Image.Image, background=(255, 255, 255)) -> np.ndarray:
    """The transform's output at the centre pixel, in [-1, 1]."""
    return ImageTransform(4, background=background)(image)[:, 2, 2].numpy()


def test_image_modes_mean_what_they_show(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    grey16.save(tmp_path / "g16.png")
    reopened = Image.open(tmp_path / "g16.png")
    assert reopened.mode.startswith("I")
    np.testing.assert_allclose(_value(reopened), 128 / 127.5 - 1, atol=1e-6)  # mid-grey, not white
    assert to_rgb(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))).getpixel((0, 0)) == (255, 255, 255)
    # Transparent pixels take the background (white by default, or the one asked for), not black.
    clear = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    np.testing.assert_allclose(_value(clear), [1, 1, 1])
    np.testing.assert_allclose(_value(clear, background=(0, 0, 0)), [-1, -1, -1])
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # black at half opacity over white: about mid-grey
    assert abs(float(_value(half)[0]) - (127 / 127.5 - 1)) < 0.01
    np.testing.assert_allclose(_value(Image.new("LA", (4, 4), (0, 0))), [1, 1, 1])
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_allclose(_value(Image.open(tmp_path / "p.png")), [1, 1, 1])
    opaque = Image.new("P", (4, 4), 0)
    opaque.putpalette([10, 20, 30] * 256)
    np.testing.assert_allclose(_value(opaque), np.array([10, 20, 30]) / 127.5 - 1, atol=1e-6)


# ---- divergence --------------------------------------------------------------------------------

def _nan_at_call(monkeypatch, call: int):
    import ldm.trainer.objective

    real, calls = ldm.trainer.objective.LatentDiffusionObjective.__call__, {"n": 0}

    def poisoned(self, unet, parts, device):
        calls["n"] += 1
        terms, loss = real(self, unet, parts, device)
        if calls["n"] == call:
            loss = loss * float("nan")
        return terms, loss

    monkeypatch.setattr(ldm.trainer.objective.LatentDiffusionObjective, "__call__", poisoned)


def test_divergence_stops_and_saves_nothing_after_it(tiny_cfg, monkeypatch):
    _nan_at_call(monkeypatch, 4)  # the loss of step 4 (no validation forward goes through the objective)
    cfg = tiny_cfg("train.max_steps=8", "train.checkpoint_every=2", "train.log_every=4")
    with pytest.raises(NonFinite, match="non-finite at step 4") as info:
        train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir / "checkpoints")] == ["step-2"]
    assert info.value.last_good.name == "step-2" and "step-2" in str(info.value)
    assert not (cfg.run_dir / "pipeline").exists()


def test_skip_step_policy_skips_the_bad_update(tiny_cfg, monkeypatch):
    _nan_at_call(monkeypatch, 3)
    cfg = tiny_cfg("train.max_steps=6", "train.on_nonfinite=skip_step")
    result = train(cfg)
    assert result["nonfinite_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in _unet(cfg.run_dir).values())


def test_a_huge_learning_rate_is_caught(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=6", "train.learning_rate=1000000", "train.log_every=1")
    with pytest.raises(NonFinite):
        train(cfg)
    assert not (cfg.run_dir / "pipeline").exists()


# ---- checkpoints that cannot run code ----------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("target", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_hostile_pickle_in_a_checkpoint_is_refused(tmp_path, tiny_cfg, target):
    cfg = tiny_cfg("train.max_steps=2", "train.checkpoint_every=2", "name=victim")
    train(cfg)
    ckpt = cfg.run_dir / "checkpoints" / "step-2"
    marker = tmp_path / "marker"
    with open(ckpt / target, "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="refus"):
        train(tiny_cfg("train.max_steps=4", f"train.resume={ckpt}", "name=victim2"))
    assert not marker.exists()


def test_lr_schedule_and_ema_are_checkpointed_without_pickle(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=0.9")
    train(cfg)
    files = {p.name for p in (cfg.run_dir / "checkpoints" / "step-2").iterdir()}
    assert {"lr_schedule.json", "lr_schedule.safetensors", "ema.json", "ema.safetensors"} <= files
    assert not [f for f in files if f.startswith("custom_checkpoint")]


# ---- runs do not mix ---------------------------------------------------------------------------

def test_runs_do_not_mix(tiny_cfg):
    first = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2", "name=shared")
    train(first)
    with pytest.raises(ValueError, match="already holds checkpoints up to step-4.*train.learning_rate"):
        train(tiny_cfg("train.max_steps=4", "train.checkpoint_every=2", "name=shared", "train.learning_rate=0.01"))
    with pytest.raises(ValueError, match=r"another config \(train.learning_rate: 0.003 -> 0.01\)"):
        train(tiny_cfg("train.max_steps=6", "name=shared", "train.resume=latest", "train.learning_rate=0.01"))
    # Run-length settings may change on resume; a damaged newest checkpoint is skipped for the one before.
    newest = first.run_dir / "checkpoints" / "step-4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    train(tiny_cfg("train.max_steps=6", "train.checkpoint_every=2", "name=shared", "train.resume=latest",
                   "train.log_every=1"))
    rows = [r for r in read_metrics(first.run_dir / "metrics.jsonl") if "epoch" in r]
    assert [r["step"] for r in rows][-4:] == [3, 4, 5, 6]  # resumed from step 2
    # Starting afresh needs the flag, which removes the old run's checkpoints first.
    train(tiny_cfg("train.max_steps=2", "name=shared", "train.overwrite=true", "train.learning_rate=0.01"))
    assert list_checkpoints(first.run_dir / "checkpoints") == []


def test_a_second_run_under_the_same_name_fails_at_once_naming_the_holder(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=1", "name=busy")
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from ldm.engine.runlock import lock_run_folder; "
            f"lock_run_folder({str(cfg.run_dir)!r}); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"/busy is in use by another run \(PID {holder.pid}\)"):
            train(cfg)
        assert not (cfg.run_dir / "metrics.jsonl").exists() and not (cfg.run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    train(cfg)  # the lock went with its process
    assert read_metrics(cfg.run_dir / "metrics.jsonl")[-1]["steps"] == 1


# ---- preemption --------------------------------------------------------------------------------

def _launch(run_args: list[str], cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           str(ROOT / "train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"), *run_args]
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if metrics.exists() and any(r.get("step", 0) >= step and "epoch" in r for r in read_metrics(metrics)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def test_sigterm_to_accelerate_launch_checkpoints_and_resumes_bit_identically(tmp_path, tiny_cfg, tiny_vae_dir,
                                                                              data_dir):
    common = [f"output_dir={tmp_path}", f"model.vae={tiny_vae_dir}", f"data.dataset={data_dir}",
              f"data.cache_dir={tmp_path / 'cache'}", "sample.seeds=[0]", "sample.num_inference_steps=2",
              "train.tensorboard=false", "train.max_steps=40", "train.log_every=1"]
    proc = _launch(["name=preempted", *common], tmp_path)
    _wait_for_step(tmp_path / "preempted" / "metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher, as a scheduler would
    proc.communicate(timeout=120)
    # The trainer (the launcher's child) got the signal through its parent's death, wrote a checkpoint, stopped.
    deadline = time.time() + 60
    while time.time() < deadline and not list_checkpoints(tmp_path / "preempted" / "checkpoints"):
        time.sleep(0.2)
    time.sleep(2)
    orphans = subprocess.run(["pgrep", "-f", "name=preempted"], capture_output=True, text=True).stdout.split()
    assert not orphans, f"trainer left running: {orphans}"
    saved = list_checkpoints(tmp_path / "preempted" / "checkpoints")
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 40
    rows = read_metrics(tmp_path / "preempted" / "metrics.jsonl")
    assert rows[-1].get("preempted") == "SIGTERM" and rows[-1]["step"] == stopped_at
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched trainer ran: CPU kernels round differently with more threads
    try:
        resumed = tiny_cfg(*common[4:], "name=preempted", "train.resume=latest")
        train(resumed)
        straight = tiny_cfg(*common[4:], "name=straight")
        train(straight)
    finally:
        torch.set_num_threads(threads)
    a, b = _unet(resumed.run_dir), _unet(straight.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the command line --------------------------------------------------------------------------

def test_user_errors_are_one_message_and_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
           f"output_dir={tmp_path}", "train.learning_rate=nan"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "train.learning_rate=nan" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--debug"], env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train_ldm.py"), "--config", str(bad_yaml)], env=ENV,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_pipeline_refuses_infinite_guidance_and_unbounded_batches(tmp_path, tiny_cfg):
    from pipelines import LDMPipeline

    cfg = tiny_cfg("train.max_steps=1")
    train(cfg)
    pipe = LDMPipeline.from_pretrained(cfg.run_dir / "pipeline")
    with pytest.raises(ValueError, match="finite"):
        pipe("a red circle", guidance_scale=float("inf"), num_inference_steps=2)
    with pytest.raises(ValueError, match="at most 512"):
        pipe("a red circle", num_images_per_prompt=10_000, num_inference_steps=2)


# ---- several processes -------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="two gloo CPU processes")
def test_one_failing_process_does_not_leave_the_other_hanging(tmp_path, tiny_vae_dir, data_dir):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_cpu_threads_per_process", "1",
           "--main_process_port", "29533", str(ROOT / "tests/scripts/fail_on_rank1.py"),
           "--config", str(ROOT / "configs/ldm/tiny.yaml"), f"output_dir={tmp_path}", f"model.vae={tiny_vae_dir}",
           f"data.dataset={data_dir}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=20",
           "train.tensorboard=false", "sample.seeds=[0]", "sample.num_inference_steps=2"]
    start = time.time()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "injected failure on process 1" in proc.stderr
    assert time.time() - start < 240
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", "fail_on_rank1.py"], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running: {left}"


def test_an_abandoned_cache_build_is_removed(tmp_path):
    import socket

    from ldm.data.cache import OWNER, remove_abandoned_builds

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name, pid in ((".abandoned.building", int(dead)), (".live.building", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    remove_abandoned_builds(tmp_path)
    assert not (tmp_path / ".abandoned.building").exists() and (tmp_path / ".live.building").exists()


def test_two_runs_building_the_same_cache_at_once_both_get_it(tmp_path, monkeypatch):
    """Two trainings started together on one dataset build the same cache at the same time (the second here
    starts and finishes while the first is filling its arrays); neither may write into the other's folder."""
    from types import SimpleNamespace

    import numpy as np

    from ldm.data.cache import build_or_open

    acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None)
    shapes = {"x": (4, 3)}

    def finish(folder):
        return {"rows": 4}

    def fill_second(arrays, rank, world):
        arrays["x"][:] = 2.0

    def fill_first(arrays, rank, world):
        arrays["x"][:2] = 1.0
        monkeypatch.setattr("ldm.data.cache.os.getpid", lambda: 1)  # the other run's main process
        inner, _ = build_or_open(tmp_path, "k", acc, "test cache", shapes, fill_second, finish)
        assert (np.asarray(inner["x"]) == 2.0).all()
        arrays["x"][2:] = 1.0

    arrays, meta = build_or_open(tmp_path, "k", acc, "test cache", shapes, fill_first, finish)
    assert meta == {"rows": 4} and (np.asarray(arrays["x"]) == 2.0).all()  # the copy finished first is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no build folder left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP on two gloo CPU processes")
def test_an_fsdp_launch_with_settings_it_cannot_honour_is_refused(tmp_path, tiny_vae_dir, data_dir):
    """FSDP's own activation checkpointing (and its first version, and parameter offload: test_config.py) is
    refused with the setting to change, before anything is read or written."""
    config = tmp_path / "fsdp.yaml"
    config.write_text((ROOT / "configs/accelerate/fsdp_cpu_2proc.yaml").read_text()
                      .replace("fsdp_activation_checkpointing: false", "fsdp_activation_checkpointing: true"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "29541", str(ROOT / "train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
           f"output_dir={tmp_path}", f"model.vae={tiny_vae_dir}", f"data.dataset={data_dir}", "train.max_steps=2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    # Each process printed the one-line refusal and exited with status 2 (the launcher then reports that).
    assert "error: fsdp_activation_checkpointing: true is not used by this trainer" in proc.stderr
    assert "train.gradient_checkpointing=true" in proc.stderr and "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


def test_a_run_that_fails_while_setting_up_leaves_no_run_folder(tmp_path):
    """A run whose data cannot be read made a folder holding only its config and lock, which then showed among
    the runs (the page's list); it is removed again. A folder that was there before is left as it was."""
    import pytest

    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig
    from ldm.trainer.train import train

    def cfg(name):
        return load_config(LDMConfig, "configs/ldm/tiny.yaml", [
            f"output_dir={tmp_path / 'runs'}", f"name={name}", f"data.dataset={tmp_path / 'no-such-folder'}"])

    with pytest.raises(ValueError, match="no-such-folder"):
        train(cfg("new"))
    assert not (tmp_path / "runs" / "new").exists()
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no-such-folder"):
        train(cfg("old"))
    assert (tmp_path / "runs" / "old" / "notes.txt").read_text() == "mine"

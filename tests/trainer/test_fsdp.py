"""Sharded training (FSDP2) on two gloo processes, launched as users launch it
(``accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml``): the weights really are sharded,
the export equals a one-process run's, sharded checkpoints resume on two processes bit for bit and on one
process, and a save that fails on one process leaves the previous checkpoint as it was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sd_folder

from ldm.engine.config import load_config
from ldm.engine.records import read_metrics
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


def _common(tmp_path, vae, data):
    return [f"output_dir={tmp_path}", f"model.vae={vae}", f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=6", "train.checkpoint_every=3", "train.tensorboard=false", "train.log_every=1",
            "sample.seeds=[0]", "sample.num_inference_steps=2"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _command(args: list[str], port: int, script: Path = ROOT / "train_ldm.py", launch: tuple = ()) -> list[str]:
    """``accelerate launch`` under the FSDP CPU config (2 processes unless ``launch`` options say otherwise)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate/fsdp_cpu_2proc.yaml"), "--num_cpu_threads_per_process", "1", *launch,
            "--main_process_port", str(port), str(script), "--config", str(ROOT / "configs/ldm/tiny.yaml"), *args]


def _launch(args: list[str], port: int, script: Path = ROOT / "train_ldm.py", check: bool = True, launch=()):
    """train_ldm.py (or ``script``) under the FSDP CPU config; the finished process."""
    proc = subprocess.run(_command(args, port, script, launch), env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one(args: list[str]):
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", args)
    train(cfg)
    return cfg.run_dir


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors."""
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b) ** 0.5
    return float(num / sum((b[k].double() ** 2).sum() for k in b) ** 0.5)


@pytest.mark.slow  # two gloo processes, ~20 s: `make test-slow` with the other FSDP tests
def test_fsdp_shards_the_weights_and_matches_one_process(tmp_path, tiny_vae_dir, data_dir):
    common = _common(tmp_path, tiny_vae_dir, data_dir)
    proc = _launch(["name=fsdp", *common], 29531)
    last = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")[-1]
    # Sharded for real (Accelerate alone would have fallen back to DDP): each process held half of what trains.
    assert last["sharding"] == "fsdp" and last["num_processes"] == 2, proc.stdout[-2000:]
    assert last["params_per_process"] <= 0.6 * last["params_total"] and last["params_total"] > 10**5
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-3" / "sharded").iterdir())
    assert [s for s in shards if s.endswith(".safetensors")] == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    # The export, gathered from both processes' shards, equals a one-process run's.
    one = _one(["name=one", *common])
    fsdp_unet, one_unet = load_file(tmp_path / "fsdp" / UNET), load_file(one / UNET)
    assert fsdp_unet.keys() == one_unet.keys()
    print(f"FSDP against one process: {_rel(fsdp_unet, one_unet):.2e}")  # shown with pytest -s
    assert _rel(fsdp_unet, one_unet) < 1e-3, _rel(fsdp_unet, one_unet)
    first = [[r for r in read_metrics(d / "metrics.jsonl") if r.get("step") == 1 and "epoch" in r][0]
             for d in (tmp_path / "fsdp", one)]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    vals = [[r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r] for d in (tmp_path / "fsdp", one)]
    assert vals[0][0] == pytest.approx(vals[1][0], rel=1e-6)  # step 0: the same weights, each process its share
    assert (tmp_path / "fsdp" / "samples" / "step-6.png").is_file()
    # The sharded checkpoint continues in one process, unsharded, to the same end point.
    resumed = _one(["name=resumed", *common, f"train.resume={tmp_path / 'fsdp' / 'checkpoints' / 'step-3'}"])
    print(f"resumed in one process against one process: {_rel(load_file(resumed / UNET), one_unet):.2e}")
    assert _rel(load_file(resumed / UNET), one_unet) < 1e-3


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bit_identically_and_survives_a_failed_save(tmp_path, tiny_vae_dir, data_dir):
    common = _common(tmp_path, tiny_vae_dir, data_dir)
    _launch(["name=whole", *common], 29533)
    # Process 1 fails while writing its shards of step 6: the run stops, step 3 stays as it was.
    failed = _launch(["name=broken", *common], 29535, script=ROOT / "tests/scripts/fail_sharded_save.py", check=False)
    assert failed.returncode != 0
    ckpts = tmp_path / "broken" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3"], failed.stderr[-3000:]
    assert "injected failure while saving on process 1" in failed.stderr
    step3 = {p.relative_to(ckpts): p.read_bytes() for p in (ckpts / "step-3").rglob("*") if p.is_file()}
    whole3 = tmp_path / "whole" / "checkpoints" / "step-3" / "sharded"
    for shard in whole3.glob("*.safetensors"):
        a, b = load_file(shard), load_file(ckpts / "step-3" / "sharded" / shard.name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(step3) > 5
    # Resumed on two processes: bit for bit the run that was never interrupted.
    _launch(["name=broken", *common, "train.resume=latest"], 29537)
    a, b = load_file(tmp_path / "whole" / UNET), load_file(tmp_path / "broken" / UNET)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # On four processes each reads its quarter of the two processes' shards: the same end point.
    _launch(["name=four", *common, f"train.resume={ckpts / 'step-3'}"], 29549, launch=("--num_processes", "4"))
    assert read_metrics(tmp_path / "four" / "metrics.jsonl")[-1]["num_processes"] == 4
    assert _rel(load_file(tmp_path / "four" / UNET), a) < 1e-3


@pytest.mark.slow
def test_two_machines_of_one_process_shard_as_one_machine_of_two(tmp_path, tiny_vae_dir, data_dir):
    """Machine ranks 0 and 1 meeting on 127.0.0.1 (gloo), as docs/training.md launches several machines: the
    shards span both, and the weights equal a 2-process single-machine run's bit for bit."""
    common = _common(tmp_path, tiny_vae_dir, data_dir)
    _launch(["name=one_machine", *common], 29551)
    nodes = [subprocess.Popen(_command(["name=two_machines", *common], 29553, launch=(
        "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip",
        "127.0.0.1")), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    last = read_metrics(tmp_path / "two_machines" / "metrics.jsonl")[-1]
    assert last["sharding"] == "fsdp" and last["params_per_process"] <= 0.6 * last["params_total"]
    a, b = load_file(tmp_path / "one_machine" / UNET), load_file(tmp_path / "two_machines" / UNET)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_a_sharded_run_checkpoints_and_resumes_bit_identically(tmp_path, tiny_vae_dir, data_dir):
    import signal
    import time

    common = [*_common(tmp_path, tiny_vae_dir, data_dir)[:4], "train.max_steps=40", "train.tensorboard=false",
              "train.log_every=1", "sample.seeds=[0]", "sample.num_inference_steps=2"]
    proc = subprocess.Popen(_command(["name=preempted", *common], 29543), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(r.get("step", 0) >= 3 and "epoch" in r for r in read_metrics(metrics))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher, as a scheduler would
    proc.communicate(timeout=120)
    from ldm.engine.checkpoint import list_checkpoints

    deadline = time.time() + 60
    while time.time() < deadline and not list_checkpoints(tmp_path / "preempted" / "checkpoints"):
        time.sleep(0.2)
    time.sleep(2)
    saved = list_checkpoints(tmp_path / "preempted" / "checkpoints")
    assert len(saved) == 1 and (saved[0] / "sharded" / "state.json").is_file(), saved
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 40 and read_metrics(metrics)[-1].get("preempted") == "SIGTERM"
    _launch(["name=preempted", *common, "train.resume=latest"], 29545)
    _launch(["name=straight", *common], 29547)
    a, b = load_file(tmp_path / "preempted" / UNET), load_file(tmp_path / "straight" / UNET)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ema_accumulation", "lora"])
def test_fsdp_variants_match_one_process(tmp_path, tiny_vae_dir, data_dir, variant):
    common = _common(tmp_path, tiny_vae_dir, data_dir)
    if variant == "lora":
        import datasets

        captions = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")["text"]
        base = sd_folder(tmp_path / "sd", tiny_vae_dir, captions)
        extra = [f"model.pretrained={base}", "finetune.method=lora", "finetune.lora_rank=4",
                 "train.learning_rate=0.01"]
    else:
        extra = ["train.ema_decay=0.9", "train.gradient_accumulation_steps=2", "train.gradient_checkpointing=true"]
    _launch(["name=fsdp", *common, *extra], 29539)
    one = _one(["name=one", *common, *extra])
    last = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")[-1]
    assert last["sharding"] == "fsdp" and last["params_per_process"] <= 0.6 * last["params_total"]
    if variant == "lora":  # only the adapters trained; the exported adapters agree
        lora = Path("lora") / "pytorch_lora_weights.safetensors"
        a, b = load_file(tmp_path / "fsdp" / lora), load_file(one / lora)
        print(f"LoRA adapters, FSDP against one process: {_rel(a, b):.2e}")
        assert a.keys() == b.keys() and _rel(a, b) < 1e-3, _rel(a, b)
    else:  # the EMA weights are exported
        a, b = load_file(tmp_path / "fsdp" / UNET), load_file(one / UNET)
        print(f"EMA U-Net, accumulation, FSDP against one process: {_rel(a, b):.2e}")
        assert _rel(a, b) < 1e-3, _rel(a, b)
        assert json.loads((tmp_path / "fsdp" / "checkpoints" / "step-6" / "ema.json").read_text())


@pytest.mark.slow
def test_fsdp_in_bf16_computes_in_bf16_on_fp32_master_weights(tmp_path, tiny_vae_dir, data_dir):
    common = _common(tmp_path, tiny_vae_dir, data_dir)
    _launch(["name=bf16", *common, "train.mixed_precision=bf16"], 29555, launch=("--mixed_precision", "bf16"))
    _launch(["name=fp32", *common], 29557)
    first = [[r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl") if r.get("step") == 1 and "epoch" in r][0]
             for n in ("bf16", "fp32")]
    assert first[0] != first[1] and first[0] == pytest.approx(first[1], rel=1e-3)  # rounded, not another model
    exported = load_file(tmp_path / "bf16" / UNET)
    assert {v.dtype for v in exported.values()} == {torch.float32}
    assert read_metrics(tmp_path / "bf16" / "metrics.jsonl")[-1]["sharding"] == "fsdp"

"""Training from streamed webdataset shards (`ldm.data.stream`), written by the tests: the tiny preset trains from
a local folder of shards and from the same shards over HTTP on 127.0.0.1 to the same weights; a resumed run is
bit-identical; two processes read disjoint samples; bad samples and unreachable shards are skipped and counted;
memory does not grow with the number of shards."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sd_folder, write_shards

from ldm.data.batches import TRAIN_STREAMS
from ldm.data.images import ImageTransform
from ldm.data.stream import StreamSource
from ldm.data.stream import main as stream_main
from ldm.engine.checkpoint import load_object_state
from ldm.engine.config import load_config
from ldm.engine.records import read_metrics
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
UNET = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("shards")
    stream_main(["pack", str(data_dir), str(out), "--per-shard", "12"])  # 96 images: 8 shards, as a user packs them
    return out


def _cfg(tmp_path, vae, dataset, *extra):
    return load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", [
        f"output_dir={tmp_path}", f"model.vae={vae}", f"data.dataset={dataset}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=6", "train.checkpoint_every=3", "data.validation_num_images=16", "sample.seeds=[0]",
        "sample.num_inference_steps=2", "train.tensorboard=false", "train.log_every=1", *extra])


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a / UNET), load_file(b / UNET)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_tiny_preset_trains_from_local_and_http_shards_alike(tmp_path, tiny_vae_dir, shards):
    local = _cfg(tmp_path, tiny_vae_dir, str(shards), "name=local")
    train(local)
    last = read_metrics(local.run_dir / "metrics.jsonl")[-1]
    assert last["steps"] == 6 and last["samples_streamed"] == 6 * 16  # decoded: what trained (the held-out 16 not)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = _cfg(tmp_path, tiny_vae_dir, f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000007}}.tar",
                      "name=http")
        train(remote)
    finally:
        server.shutdown()
    assert _same(local.run_dir, remote.run_dir)  # the same samples in the same order


def test_a_resumed_streaming_run_is_bit_identical(tmp_path, tiny_vae_dir, shards):
    straight = _cfg(tmp_path, tiny_vae_dir, str(shards), "name=straight")
    train(straight)
    resumed = _cfg(tmp_path, tiny_vae_dir, str(shards), "name=resumed", "train.resume=latest")
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.run_dir / "checkpoints" / "step-3", resumed.run_dir / "checkpoints" / "step-3")
    shutil.copy(straight.run_dir / "config.yaml", resumed.run_dir / "config.yaml")
    grab = SimpleNamespace(load_state_dict=lambda state: grab.__dict__.update(state=state))
    load_object_state(grab, resumed.run_dir / "checkpoints" / "step-3", "stream")
    assert grab.state["num_processes"] == 1 and len(grab.state["positions"]) == 1  # [epoch, shard, sample, window, taken]
    assert grab.state["positions"][0][4] > 0  # stopped inside a shuffle window: the resume re-reads and skips
    train(resumed)
    assert _same(straight.run_dir, resumed.run_dir)


def test_two_processes_read_disjoint_samples_and_together_all(tmp_path):
    write_shards(tmp_path, num_shards=8, per_shard=6)
    shard_list = sorted(str(p) for p in tmp_path.glob("*.tar"))
    seen = []
    for rank in (0, 1):
        acc = SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"))
        source = StreamSource(shard_list, 3, TRAIN_STREAMS, acc, per_process=4, accumulation=1, batch_size=8,
                              transform=ImageTransform(32, True, False), tokenize=lambda c: c, random_flip=False,
                              shuffle_buffer=12)  # windows of two shards: 24 samples, one epoch, in 2 windows
        seen.append([caption for _, _, share in source.iterate(0, 6) for _, caption in share.samples])
        in_shard_order = [f"a square of shard {s} number {i}" for s in range(8) for i in range(6)]
        assert seen[-1] != sorted(seen[-1], key=in_shard_order.index)  # shuffled within windows
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 48


SHAPES = [(32, 32), (48, 24), (24, 48), (40, 24), (32, 32), (24, 40)]  # (w, h): buckets 32x32, 24x40, 40x24


def test_aspect_buckets_on_a_stream_give_one_bucket_per_share_from_a_bounded_queue(tmp_path):
    from ldm.data.buckets import make_buckets, nearest_bucket

    write_shards(tmp_path, num_shards=6, per_shard=12, shapes=SHAPES)
    shape_of = {f"a square of shard {s} number {i}": SHAPES[(s * 12 + i) % len(SHAPES)] for s in range(6)
                for i in range(12)}
    buckets = make_buckets(32, 8, 2.0)
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    source = StreamSource(sorted(str(p) for p in tmp_path.glob("*.tar")), 3, TRAIN_STREAMS, acc, per_process=4,
                          accumulation=1, batch_size=4, transform=ImageTransform(32, True, False), tokenize=lambda c: c,
                          random_flip=False, shuffle_buffer=10, buckets=buckets)
    seen, sizes = [], set()
    for step, _, share in source.iterate(0, 30):  # 120 samples: over one epoch of 72
        assert {buckets[nearest_bucket(*shape_of[c], buckets)] for _, c in share.samples} == {share.size}
        assert len(source.pending) <= len(buckets) * (4 - 1)
        pixels = source.load(source.plan(step, share), slice(0, 4))["pixels"]
        assert pixels.shape == (4, 3, *share.size)
        seen += [c for _, c in share.samples]
        sizes.add(share.size)
    assert sizes == {(32, 32), (24, 40), (40, 24)}
    assert len(set(seen[:60])) == 60  # no sample twice within the first epoch


def test_a_bucketed_streaming_run_trains_and_resumes_bit_identically(tmp_path, tiny_vae_dir):
    write_shards(tmp_path / "mixed", num_shards=6, per_shard=12, shapes=SHAPES)
    extra = ("data.bucketing=true", "data.bucket_step=8", "data.shuffle_buffer=20", "data.validation_num_images=8",
             "train.batch_size=4")
    straight = _cfg(tmp_path, tiny_vae_dir, str(tmp_path / "mixed"), "name=b_straight", *extra)
    train(straight)
    resumed = _cfg(tmp_path, tiny_vae_dir, str(tmp_path / "mixed"), "name=b_resumed", "train.resume=latest", *extra)
    (resumed.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight.run_dir / "checkpoints" / "step-3", resumed.run_dir / "checkpoints" / "step-3")
    shutil.copy(straight.run_dir / "config.yaml", resumed.run_dir / "config.yaml")
    grab = SimpleNamespace(load_state_dict=lambda state: grab.__dict__.update(state=state))
    load_object_state(grab, resumed.run_dir / "checkpoints" / "step-3", "stream")
    assert grab.state["pending"][0]  # samples waited in bucket queues at the checkpoint: the resume reads them again
    train(resumed)
    assert _same(straight.run_dir, resumed.run_dir)


def test_bad_samples_and_an_unreachable_shard_are_skipped_and_counted(tmp_path, tiny_vae_dir):
    write_shards(tmp_path / "bad", num_shards=4, per_shard=10, bad={"s0001_0003": "image", "s0002_0005": "caption"})
    pattern = str(tmp_path / "bad" / "shard-{0000..0004}.tar")  # shard-0004 does not exist
    cfg = _cfg(tmp_path, tiny_vae_dir, pattern, "data.validation_num_images=4", "train.batch_size=8",
               "data.max_bad_fraction=0.2", "train.checkpoint_every=0", "data.shuffle_buffer=36")  # a window an epoch
    train(cfg)
    last = read_metrics(cfg.run_dir / "metrics.jsonl")[-1]
    # 6 steps of 8 from windows of the 36 samples left: the first window's are all taken, so each bad one is met
    # once or twice
    assert set(last["bad_samples_skipped"]) == {"undecodable image", "no caption"}
    assert all(1 <= n <= 2 for n in last["bad_samples_skipped"].values())
    assert last["shard_reads_failed"] >= 1
    strict = _cfg(tmp_path, tiny_vae_dir, pattern, "name=strict", "data.validation_num_images=4",
                  "train.batch_size=8", "data.max_bad_fraction=0.01", "train.max_steps=20", "train.checkpoint_every=0")
    with pytest.raises(ValueError, match="more than data.max_bad_fraction=0.01"):
        train(strict)


@pytest.mark.slow
def test_memory_of_a_five_step_run_is_flat_from_10_to_1000_shards(tmp_path, tiny_vae_dir):
    peaks = {}
    for n in (10, 1000):
        write_shards(tmp_path / f"n{n}", num_shards=n, per_shard=2, size=32)
        script = (f"import resource, sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                  "from ldm.engine.config import load_config\nfrom ldm.trainer.config import LDMConfig\n"
                  "from ldm.trainer.train import train\n"
                  f"train(load_config(LDMConfig, {str(ROOT / 'configs/ldm/tiny.yaml')!r}, "
                  f"['output_dir={tmp_path}', 'name=n{n}', 'model.vae={tiny_vae_dir}', "
                  f"'data.dataset={tmp_path / f'n{n}'}', 'data.cache_dir={tmp_path / 'cache'}', 'train.max_steps=5', "
                  "'data.validation_num_images=4', 'train.batch_size=4', 'train.checkpoint_every=0', "
                  "'sample.seeds=[0]', 'sample.num_inference_steps=2', 'train.tensorboard=false']))\n"
                  "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks[n] = int(proc.stdout.split("PEAK")[-1])
    print(f"peak RSS, KiB: {peaks}")
    assert peaks[1000] < 1.1 * peaks[10], peaks


@pytest.mark.slow
def test_two_processes_stream_and_resume_bit_identically(tmp_path, tiny_vae_dir, shards):
    """Under accelerate launch on 2 gloo processes: each streams its own shards (together 2 x 3 x 8 samples), and
    the step-3 checkpoint resumed on 2 processes ends bit for bit where the straight run did."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [f"output_dir={tmp_path}", f"model.vae={tiny_vae_dir}", f"data.dataset={shards}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6", "train.checkpoint_every=3",
              "data.validation_num_images=16", "sample.seeds=[0]", "sample.num_inference_steps=2",
              "train.tensorboard=false", "train.log_every=1"]

    def launch(*args):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_cpu_threads_per_process", "1",
               "--main_process_port", "29561", str(ROOT / "train_ldm.py"), "--config",
               str(ROOT / "configs/ldm/tiny.yaml"), *common, *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("name=straight")
    last = read_metrics(tmp_path / "straight" / "metrics.jsonl")[-1]
    assert last["num_processes"] == 2 and last["samples_streamed"] == 6 * 16
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    shutil.copy(tmp_path / "straight" / "config.yaml", tmp_path / "resumed" / "config.yaml")
    launch("name=resumed", "train.resume=latest")
    assert _same(tmp_path / "straight", tmp_path / "resumed")


def test_latent_shards_are_precomputed_resumably_and_train(tmp_path, tiny_vae_dir, shards):
    from ldm.precompute import precompute

    cfg = _cfg(tmp_path, tiny_vae_dir, str(shards), "name=latents")
    out = tmp_path / "latents"
    first = precompute(cfg, out)
    assert first["shards_written"] == 8 and first["samples"] == 96
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards.iterdir())
    kept = (out / "shard-000003.tar").read_bytes()
    (out / "shard-000005.tar").unlink()  # as if killed while writing it
    again = precompute(cfg, out)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 7
    assert (out / "shard-000003.tar").read_bytes() == kept
    latent_run = _cfg(tmp_path, tiny_vae_dir, str(out), "name=from_latents")
    train(latent_run)
    last = read_metrics(latent_run.run_dir / "metrics.jsonl")[-1]
    assert last["samples_streamed"] == 6 * 16 and last["best_val_loss"] < 2
    with pytest.raises(ValueError, match="precomputed with another VAE encoder"):
        train(_cfg(tmp_path, "builtin", str(out), "name=other_vae"))
    with pytest.raises(ValueError, match="holds latents of 8x8, images of 32 px, but data.resolution=64 needs 16x16"):
        train(_cfg(tmp_path, tiny_vae_dir, str(out), "name=size", "data.resolution=64"))
    with pytest.raises(ValueError, match="data.random_flip=true cannot be applied to the precomputed"):
        train(_cfg(tmp_path, tiny_vae_dir, str(out), "name=flip", "data.random_flip=true"))


def test_latent_shards_carry_a_frozen_text_encoders_embeddings_which_training_reads(tmp_path, tiny_vae_dir, shards,
                                                                                      monkeypatch, caplog):
    import io
    import tarfile

    import numpy as np

    import ldm.trainer.data
    from ldm.precompute import precompute

    captions = [f"a square of shard {s} number {i}" for s in range(8) for i in range(12)]
    base = sd_folder(tmp_path / "sd", tiny_vae_dir, captions)
    extra = (f"model.pretrained={base}", "train.learning_rate=0.001")
    out = tmp_path / "latents"
    assert precompute(_cfg(tmp_path, tiny_vae_dir, str(shards), *extra), out)["text_embeddings"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        context = np.load(io.BytesIO(tar.extractfile("00000.ctx.npy").read()))
    assert context.shape == (16, 32) and context.dtype == np.float16  # (max_length, hidden size)

    read = _cfg(tmp_path, tiny_vae_dir, str(out), "name=read", *extra)
    train(read)
    monkeypatch.setattr(ldm.trainer.data, "precomputed_text", lambda *a: False)  # the encoder runs every step
    encoded = _cfg(tmp_path, tiny_vae_dir, str(out), "name=encoded", *extra)
    train(encoded)
    a, b = load_file(read.run_dir / UNET), load_file(encoded.run_dir / UNET)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # the same training, up to float16 embeddings
    assert not all(torch.equal(a[k], b[k]) for k in a)  # ... which were read, not recomputed
    monkeypatch.undo()

    other = sd_folder(tmp_path / "other", tiny_vae_dir, ["another vocabulary altogether"])
    with caplog.at_level("WARNING"):
        train(_cfg(tmp_path, tiny_vae_dir, str(out), "name=other", f"model.pretrained={other}", "train.max_steps=1"))
    assert "holds text embeddings of another text encoder or tokenizer" in caplog.text

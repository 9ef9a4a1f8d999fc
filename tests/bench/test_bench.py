"""Smoke test of bench/train_throughput.py: both sides run a few steps of the cpu-tiny preset in-process and
the results file holds usable numbers. Speed itself is not asserted (it depends on the machine)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_window_divides_warmup_and_steps():
    bench = _load_bench()
    assert bench.log_every_for(steps=20, warmup=5) == 5
    assert bench.log_every_for(steps=30, warmup=6) == 6
    assert bench.log_every_for(steps=2, warmup=1) == 1
    assert bench.log_every_for(steps=12, warmup=0) == 3  # the longest window giving >= 4 timed rows


@pytest.mark.slow  # ~6 s: `make test-slow`
def test_cpu_tiny_smoke(tmp_path):
    bench = _load_bench()
    out = tmp_path / "results.json"
    returned = bench.main(["--preset", "cpu-tiny", "--num-images", "24", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["preset"] == "cpu-tiny" and results["batch_size"] == 4 and results["steps"] == 2
    assert results["ours_images_per_s"] > 0
    assert results["diffusers_style_images_per_s"] > 0 and results["diffusers_tuned_images_per_s"] > 0
    assert math.isfinite(results["ratio"]) and results["ratio"] > 0
    assert math.isfinite(results["ratio_vs_tuned"]) and results["ratio_vs_tuned"] > 0
    assert results["diffusers_tuned"]["compiled"] is False  # auto: compiled on CUDA only
    assert results["ours"]["warmup_steps_s"] > 0 and results["diffusers_tuned"]["warmup_steps_s"] > 0
    assert len(results["diffusers_tuned"]["window_images_per_s"]) == 2
    assert len(results["ours"]["window_images_per_s"]) == 2  # log_every=1: one row per timed step
    assert len(results["diffusers_style"]["window_images_per_s"]) == 2
    assert results["ours_setup_and_cache_s"] is not None and results["ours_setup_and_cache_s"] > 0


@pytest.mark.slow  # ~13 s of sampling: `make test-slow`
def test_sample_latency_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("sample_latency", BENCH.with_name("sample_latency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sample.json"
    returned = bench.main(["--preset", "cpu-tiny", "--steps", "2", "--batches", "2", "--reps", "1",
                           "--sides", "ours-eager,diffusers-eager", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    for side in ("ours-eager", "diffusers-eager"):
        row = results["sides"][side]
        assert row["batch_2"]["warm_s"] > 0 and row["batch_2"]["images_per_s"] > 0 and row["batch_2"]["cold_s"] > 0
    # the same folder, scheduler, seed and prompts: diffusers draws our images
    assert results["sides"]["diffusers-eager"]["max_abs_diff_to_first_side"] < 2e-3
    assert set(results["ratios"]) == {f"diffusers-eager/ours-eager batch {b} {k}" for b in (2,)
                                      for k in ("warm", "cold")}


def test_stream_throughput_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("stream_throughput", BENCH.parent / "stream_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "stream.json"
    returned = bench.main(["--preset", str(BENCH.parents[1] / "configs/ldm/tiny.yaml"), "--images", "48",
                           "--per-shard", "8", "--steps", "3", "--warmup", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned)) and results["shards"] == 6
    assert results["cached_folder"]["images_per_s"] > 0 and results["streamed_shards"]["images_per_s"] > 0
    assert math.isfinite(results["ratio_streamed_over_cached"]) and results["ratio_streamed_over_cached"] > 0
    assert results["streamed_latent_shards"]["images_per_s"] > 0 and results["ratio_streamed_latents_over_cached"] > 0

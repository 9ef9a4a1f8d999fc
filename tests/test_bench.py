"""Smoke test of bench/train_throughput.py: both sides run a few steps of the cpu-tiny preset in-process and
the results file holds usable numbers. Speed itself is not asserted (it depends on the machine)."""

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


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


def test_cpu_tiny_smoke(tmp_path):
    bench = _load_bench()
    out = tmp_path / "results.json"
    returned = bench.main(["--preset", "cpu-tiny", "--num-images", "24", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["preset"] == "cpu-tiny" and results["batch_size"] == 4 and results["steps"] == 2
    assert results["ours_images_per_s"] > 0
    assert results["diffusers_style_images_per_s"] > 0
    assert math.isfinite(results["ratio"]) and results["ratio"] > 0
    assert len(results["ours"]["window_images_per_s"]) == 2  # log_every=1: one row per timed step
    assert len(results["diffusers_style"]["window_images_per_s"]) == 2
    assert results["ours_setup_and_cache_s"] is not None and results["ours_setup_and_cache_s"] > 0

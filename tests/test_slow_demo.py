"""The demo's targets, end to end (about 10 minutes on 2 CPU cores): `make test-slow`."""

import pytest

from ldm.config import LDMConfig, load_config
from ldm.evaluate import evaluate
from ldm.train import train


@pytest.mark.slow
def test_shapes_preset_meets_demo_targets(tmp_path):
    cfg = load_config(LDMConfig, "configs/ldm/shapes.yaml", [f"output_dir={tmp_path}", "name=slow-demo"])
    train(cfg)
    result = evaluate(str(cfg.run_dir / "pipeline"), "shapes", num_images=96, out=str(cfg.run_dir))
    assert result["num_images"] == 96
    assert result["colour_accuracy"] >= 0.90, result
    assert result["shape_accuracy"] >= 0.80, result

"""The presets' targets, end to end (about 10 minutes each on 2 CPU cores): `make test-slow`."""

import pytest

from ldm.engine.config import load_config
from ldm.eval.scoring import evaluate
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train


@pytest.mark.slow
def test_shapes_preset_meets_demo_targets(tmp_path):
    cfg = load_config(LDMConfig, "configs/ldm/shapes.yaml", [f"output_dir={tmp_path}", "name=slow-demo"])
    train(cfg)
    result = evaluate(str(cfg.run_dir / "pipeline"), "shapes", num_images=96, out=str(cfg.run_dir),
                      guidance_scale=cfg.sample.guidance_scale)  # as `make demo` scores it
    assert result["num_images"] == 96
    assert result["colour_accuracy"] >= 0.98, result
    assert result["shape_accuracy"] >= 0.95, result
    assert result["position_accuracy"] >= 0.95, result
    assert result["frechet_distance"] <= 3 * result["frechet_distance_floor"], result
    assert result["diversity"] >= 0.5 * result["diversity_real"], result  # not one picture per prompt


@pytest.mark.slow
def test_digits_preset_draws_the_digit_asked_for(tmp_path):
    cfg = load_config(LDMConfig, "configs/ldm/digits.yaml", [f"output_dir={tmp_path}", "name=slow-digits"])
    train(cfg)
    result = evaluate(str(cfg.run_dir / "pipeline"), "digits", num_images=100, out=str(cfg.run_dir))
    assert result["digit_accuracy"] >= 0.97, result
    assert result["frechet_distance"] <= 3 * result["frechet_distance_floor"], result

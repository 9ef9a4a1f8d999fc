"""The variance study end to end at toy size: every model x sampler x steps cell is scored, each model's bound
is estimated and checked against the full bound, and the table and plot are written."""

import json

import pytest

from demos.variance_study import format_table, rebound, run_study
from ldm.diffusion.schedulers import sampling_scheduler, with_variance


def test_variance_study_writes_every_cell(tmp_path, tiny_vae_dir):
    out = tmp_path / "study"
    result = run_study(out, steps=2, sampling_steps=(2, 3), num_images=32, nll_images=2, nll_stride=50,
                       check_images=1, preset="configs/ldm/tiny.yaml", models=("fixed", "vlb"),
                       extra=[f"model.vae={tiny_vae_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    cells = [r for r in result["records"] if "sampler" in r]
    assert {(r["model"], r["sampler"], r["steps"]) for r in cells} == {
        (m, s, n) for m in ("fixed", "vlb") for s in ("ddpm", "ddim") for n in (2, 3)}
    bounds = {r["model"]: r for r in result["records"] if "nll_bpd" in r}
    assert set(bounds) == {"fixed", "vlb"} and all(r["check_full_bpd"] > 0 for r in bounds.values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] == result["records"] and saved["settings"]["sampling_steps"] == [2, 3]
    assert (out / "quality_vs_steps.png").stat().st_size > 0
    assert "NLL bound" in format_table(result["records"])
    again = rebound(out, nll_images=2, nll_stride=10, check_images=0)  # bound again, nothing retrained
    assert [r for r in again["records"] if "sampler" in r] == cells
    assert [r["nll_stride"] for r in again["records"] if "nll_bpd" in r] == [10, 10]
    with pytest.raises(ValueError, match="num-images must be at least 32"):
        run_study(out, num_images=16)


def test_with_variance_switches_a_ddpm_scheduler_only():
    from diffusers import DDPMScheduler

    learned = DDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    assert with_variance(learned, None) is learned
    assert with_variance(learned, "fixed_small").config.variance_type == "fixed_small"
    assert with_variance(DDPMScheduler(num_train_timesteps=10), "learned").config.variance_type == "learned_range"
    with pytest.raises(ValueError, match="variance 'big'"):
        with_variance(learned, "big")
    with pytest.raises(ValueError, match="works with ddpm"):
        with_variance(sampling_scheduler(learned, "ddim"), "fixed_small")

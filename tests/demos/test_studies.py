"""The variance study end to end at toy size: every model x sampler x steps cell is scored, each model's bound
is estimated and checked against the full bound, and the table and plot are written."""

import dataclasses
import json

import pytest

from demos.variance_study import Space, format_table, rebound, run_study
from ldm.diffusion.schedulers import sampling_scheduler, with_variance


@pytest.mark.parametrize("names", [("latent",), pytest.param(("latent", "pixel"), marks=pytest.mark.slow)])
def test_variance_study_writes_every_cell_with_bands_and_goes_on_after_an_interruption(names, tmp_path, tiny_vae_dir,
                                                                                       monkeypatch):
    import demos.variance_study as study

    out = tmp_path / "study"
    spaces = {"latent": Space("configs/ldm/tiny.yaml", 2, (2, 3), num_images=32,
                              overrides=(f"model.vae={tiny_vae_dir}",)),
              "pixel": Space("configs/ldm/tiny.yaml", 2, (2,), ("ddpm",), 32, ("model.vae=none",))}
    spaces = {k: spaces[k] for k in names}
    last = names[-1]
    kwargs = dict(nll_images=2, nll_stride=50, check_images=1, models=("fixed", "vlb"),
                  extra=[f"data.cache_dir={tmp_path / 'cache'}"], bootstrap=5)
    result = run_study(out, spaces, **kwargs)
    cells = [r for r in result["records"] if "sampler" in r]
    assert {(r["space"], r["model"], r["sampler"], r["steps"]) for r in cells} == {
        ("latent", m, s, n) for m in ("fixed", "vlb") for s in ("ddpm", "ddim") for n in (2, 3)} | {
        ("pixel", m, "ddpm", 2) for m in ("fixed", "vlb") if "pixel" in names}
    for r in cells:  # a band around each score, from the cell's own images
        for k in ("all_accuracy", "frechet_distance"):
            assert r["bands"][k]["low"] <= r["bands"][k]["high"] and r["bands"][k]["std"] >= 0
    bounds = {(r["space"], r["model"]): r for r in result["records"] if "nll_bpd" in r}
    assert set(bounds) == {(s, m) for s in spaces for m in ("fixed", "vlb")}
    assert all(r["check_full_bpd"] > 0 for r in bounds.values())
    assert bounds["latent", "vlb"]["nll_space"] == "latents"
    assert "pixel" not in names or bounds["pixel", "fixed"]["nll_space"].startswith("pixels")
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] == result["records"] and saved["settings"]["spaces"]["latent"]["sampling_steps"] == [2, 3]
    assert (out / "quality_vs_steps.png").stat().st_size > 0
    table = format_table(result["records"])
    assert "NLL bound" in table and f"{last} vlb" in table and "trained 2 steps" in table

    # An interrupted study: its last cell and last bound not written yet. The rerun trains nothing and computes
    # exactly what is missing.
    lost = [r for r in saved["records"] if r["space"] == last and r["model"] == "vlb" and "train_steps" not in r][-2:]
    saved["records"] = [r for r in saved["records"] if r not in lost]
    (out / "results.json").write_text(json.dumps(saved))
    monkeypatch.setattr(study, "train", lambda cfg: pytest.fail("a trained model was trained again"))
    again = run_study(out, spaces, **kwargs)
    assert len(again["records"]) == len(result["records"])
    assert [(r.get("sampler"), "nll_bpd" in r) for r in again["records"][-2:]] == [(lost[0]["sampler"], False),
                                                                                    (None, True)]
    redone = again["records"][-2]  # the same seeds: the same images and scores as before the interruption
    assert {**redone, "sampling_time_s": 0} == {**lost[0], "sampling_time_s": 0}

    # Paired cells added to a study that has its cells: they are computed, nothing else is redone.
    paired = {**spaces, "latent": dataclasses.replace(spaces["latent"], paired_steps=(2,), paired_images=32)}
    more = run_study(out, paired, **kwargs)
    assert more["records"][:-1] == again["records"]
    pair = more["records"][-1]
    assert (pair["space"], pair["paired_steps"], pair["num_images"], pair["against"]) == ("latent", 2, 32, "fixed")
    assert set(pair["scores"]) == {"fixed", "vlb"} and set(pair["differences"]) == {"vlb"}
    fd = pair["differences"]["vlb"]["frechet_distance"]
    assert fd["difference"] == pytest.approx(pair["scores"]["vlb"]["frechet_distance"]
                                             - pair["scores"]["fixed"]["frechet_distance"])
    assert fd["low"] <= fd["difference"] <= fd["high"]
    assert "latent paired, 32 images at 2 ddpm steps" in format_table(more["records"])
    assert run_study(out, paired, **kwargs)["records"] == more["records"]
    again = more

    bounded = rebound(out, nll_images=2, nll_stride=10, check_images=0)  # bound again, nothing retrained
    assert [r for r in bounded["records"] if "sampler" in r] == [r for r in again["records"] if "sampler" in r]
    assert [r["nll_stride"] for r in bounded["records"] if "nll_bpd" in r] == [10] * 2 * len(names)
    with pytest.raises(ValueError, match="holds a study with other settings .*bootstrap"):
        run_study(out, spaces, **{**kwargs, "bootstrap": 6})
    with pytest.raises(ValueError, match="num-images must be at least 32"):
        run_study(tmp_path / "other", {"latent": Space("configs/ldm/tiny.yaml", 2, num_images=16)})


def test_bootstrap_bands_are_zero_for_identical_images_and_cover_the_score():
    from ldm.eval.scorers import eval_prompts, real_images, score
    from ldm.eval.scoring import bootstrap_bands, distribution_scores

    prompts = [p for p in eval_prompts("shapes")[:4] for _ in range(8)]
    images = real_images("shapes", prompts, seed=3)
    bands = bootstrap_bands("shapes", images, prompts, resamples=50)
    full = {**score("shapes", images, prompts), **distribution_scores("shapes", images, prompts)}
    for k in ("colour_accuracy", "all_accuracy", "frechet_distance"):  # each band holds its score
        assert bands[k]["low"] - 1e-9 <= full[k] <= bands[k]["high"] + 1e-9
    fd = bands["frechet_distance"]
    assert abs((fd["low"] + fd["high"]) / 2 - full["frechet_distance"]) < 1e-9 or fd["low"] == 0
    assert bands["colour_accuracy"]["std"] == 0  # real drawings: every colour reads right in every resample
    assert bands["frechet_distance"]["std"] > 0
    same = [images[0]] * 8 + [images[8]] * 8
    assert bootstrap_bands("shapes", same, prompts[:16], resamples=10)["frechet_distance"]["std"] < 1e-9
    with pytest.raises(ValueError, match="at least 2, got 1"):
        bootstrap_bands("shapes", images, prompts, resamples=1)


def test_paired_bands_read_the_difference_of_two_image_sets_drawn_for_the_same_prompts():
    from ldm.eval.scorers import eval_prompts, real_images
    from ldm.eval.scoring import distribution_scores, paired_bands

    prompts = [p for p in eval_prompts("shapes")[:4] for _ in range(8)]
    a, b = real_images("shapes", prompts, seed=3), real_images("shapes", prompts, seed=4)
    same = paired_bands("shapes", a, a, prompts, resamples=20)
    assert all(v["difference"] == 0 and v["std"] == 0 for v in same.values())
    bands = paired_bands("shapes", a, b, prompts, resamples=50)
    fd = bands["frechet_distance"]
    expected = (distribution_scores("shapes", b, prompts)["frechet_distance"]
                - distribution_scores("shapes", a, prompts)["frechet_distance"])
    assert fd["difference"] == pytest.approx(expected, abs=1e-6) and fd["std"] > 0
    assert fd["low"] < fd["difference"] < fd["high"]
    with pytest.raises(ValueError, match="got 32 and 31 images for 32 prompts"):
        paired_bands("shapes", a, b[:-1], prompts)


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

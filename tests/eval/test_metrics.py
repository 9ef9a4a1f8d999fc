"""Distribution metrics: the Fréchet distance against closed forms and what it must see (layout,
collapse), diversity, and the evaluation's floors from real images."""

import numpy as np
import pytest
import torch

from ldm.eval.metrics import FixedFeatures, diversity, frechet_distance, image_frechet_distance, mean_pairwise_distance


def test_frechet_distance_matches_scipy_on_full_rank_covariances():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    # rank-deficient covariances (fewer samples than features) stay finite and non-negative
    c, d = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    fd = frechet_distance(c.mean(0), np.cov(c, rowvar=False), d.mean(0), np.cov(d, rowvar=False))
    assert np.isfinite(fd) and fd > 0


def _squares(positions, n=64, seed=0):
    """White 8x8 squares on black at one of ``positions`` (top-left corners), with a one-pixel jitter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 32, 32)
    for i in range(n):
        r, c = positions[i % len(positions)]
        dr, dc = torch.randint(0, 2, (2,), generator=g).tolist()
        x[i, :, r + dr:r + dr + 8, c + dc:c + dc + 8] = 1
    return x


def test_layout_features_see_where_things_are():
    left, right = _squares([(4, 4), (20, 4)]), _squares([(4, 20), (20, 20)], seed=1)
    again = _squares([(4, 4), (20, 4)], seed=2)  # the same distribution as `left`: the sampling noise
    # Mean-pooled features barely tell a square on the left from one on the right; the layout features do.
    assert image_frechet_distance(left, right, layout=False) < 2 * image_frechet_distance(left, again, layout=False)
    assert image_frechet_distance(left, right) > 100 * image_frechet_distance(left, again)
    assert FixedFeatures(layout=True)(left).shape == (64, 224)


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    same = _squares([(4, 4)], n=8)
    same[:] = same[0]
    assert mean_pairwise_distance(same) == 0
    spread = _squares([(4, 4), (20, 20)], n=8)
    assert diversity(spread, ["a", "b"] * 4) < mean_pairwise_distance(spread)  # groups of one position each
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(same[:1])


def test_distribution_scores_of_real_images_sit_at_the_floor_and_collapse_does_not():
    from ldm.data.builtin import shapes_eval_prompts
    from ldm.eval.scorers import real_images
    from ldm.eval.scoring import distribution_scores

    prompts = [p for p in shapes_eval_prompts() for _ in range(6)]
    real = distribution_scores("shapes", real_images("shapes", prompts, seed=123), prompts)
    assert real["frechet_distance"] < 1.5 * real["frechet_distance_floor"]
    assert real["diversity"] == pytest.approx(real["diversity_real"], rel=0.15)
    one_each = real_images("shapes", prompts[::6], seed=123)
    collapsed = distribution_scores("shapes", [im for im in one_each for _ in range(6)], prompts)
    assert collapsed["diversity"] == 0 and collapsed["frechet_distance"] > 3 * collapsed["frechet_distance_floor"]

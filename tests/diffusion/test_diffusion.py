"""The diffusion math against independent references: diffusers' DDPMScheduler, torch.distributions,
and closed forms derived separately in float64."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.gaussian import GaussianDiffusion, discretized_gaussian_nll, gaussian_nll, make_betas, normal_kl

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
]


def _pair(T=100, **kw):
    sched = DDPMScheduler(num_train_timesteps=T, clip_sample=False, **kw)
    return sched, GaussianDiffusion.from_scheduler_config(sched.config)


@pytest.mark.parametrize("kw", SCHEDULES + [dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                                 prediction_type="v_prediction")])
def test_betas_match_diffusers(kw):
    sched, diff = _pair(T=1000, **kw)
    # diffusers computes in float32; the zero-SNR rescale amplifies its rounding to ~4e-7 absolute.
    atol = 1e-6 if kw.get("rescale_betas_zero_snr") else 1e-7
    torch.testing.assert_close(diff.betas.float(), sched.betas, rtol=1e-5, atol=atol)
    torch.testing.assert_close(diff.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_zero_terminal_snr():
    sched, diff = _pair(T=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert diff.alphas_cumprod[-1] == 0
    plain = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert math.isclose(diff.alphas_cumprod[0].item(), (1 - plain[0]).item(), rel_tol=1e-9)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        GaussianDiffusion.from_scheduler_config(sched.config, prediction_type="epsilon")


@pytest.mark.parametrize("kw", SCHEDULES)
def test_q_sample_and_velocity_match_diffusers(kw):
    sched, diff = _pair(**kw)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 17, 50, 98, 99])
    torch.testing.assert_close(diff.q_sample(x0, t, noise), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diff.get_velocity(x0, noise, t), sched.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("t", [0, 1, 40, 99])
def test_step_matches_diffusers(prediction_type, variance_type, t):
    sched, diff = _pair(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                        variance_type=variance_type)
    sched.set_timesteps(sched.config.num_train_timesteps)
    g = torch.Generator().manual_seed(t)
    c = 4 * (2 if variance_type == "learned_range" else 1)
    xt = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(3, c, 8, 8, generator=g, dtype=torch.float64)
    if variance_type == "learned_range":
        out[:, 4:] = out[:, 4:].tanh()
    ref = sched.step(out.float(), t, xt.float(), generator=torch.Generator().manual_seed(123)).prev_sample
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    tt = torch.full((3,), t)
    ours = diff.p_sample(out, xt, tt, noise.double())
    torch.testing.assert_close(ours.float(), ref, rtol=1e-4, atol=1e-4)
    # x̂_0 too
    ref_x0 = sched.step(out.float(), t, xt.float(), generator=torch.Generator().manual_seed(1)).pred_original_sample
    torch.testing.assert_close(diff.p_mean_variance(out, xt, tt)["pred_x0"].float(), ref_x0, rtol=1e-4, atol=1e-4)


def test_posterior_matches_gaussian_conditioning_float64():
    """μ̃ and β̃ against Bayes' rule on q(x_{t-1}|x_0) q(x_t|x_{t-1}), derived without the coefficients."""
    _, diff = _pair(T=50, beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 30, 49])
    beta = diff.betas[t][:, None]
    ab_prev = torch.cumprod(1 - diff.betas, 0)[t - 1][:, None]
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = 1 / precision
    mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * xt / beta)
    ours_mean, ours_var, ours_logvar = diff.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(ours_mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_var.expand_as(var), var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_logvar.exp().expand_as(var), var, rtol=1e-10, atol=1e-12)


def test_normal_kl_and_nll_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, x = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(3))
    lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(2))
    p, q = torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    torch.testing.assert_close(gaussian_nll(x, m1, lv1), -p.log_prob(x))


@pytest.mark.parametrize("kw", SCHEDULES)
def test_conversions_round_trip(kw):
    _, diff = _pair(**kw)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (8,), generator=g)
    xt = diff.q_sample(x0, t, eps)
    v = diff.get_velocity(x0, eps, t)
    torch.testing.assert_close(diff.predict_x0_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(diff.predict_eps_from_x0(xt, t, x0), eps)
    torch.testing.assert_close(diff.predict_x0_from_v(xt, t, v), x0)
    torch.testing.assert_close(diff.predict_eps_from_v(xt, t, v), eps)


def _target(sched, x0, noise, t):
    """The regression target by diffusers' scheduler (an independent reference): ε, v or x_0."""
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return x0


def _oracle(sched, x0, noise, var_values=None):
    """A 'network' that returns the true target (and fixed variance values) for any x_t."""
    def model(xt, t):
        out = _target(sched, x0, noise, t)
        return out if var_values is None else torch.cat([out, var_values.expand_as(out)], 1)
    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_losses_oracle_and_snr_weights(prediction_type):
    sched, diff = _pair(beta_schedule="linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 5, 50, 99])
    terms = diff.training_losses(_oracle(sched, x0, noise), x0, t, noise)
    assert torch.all(terms["mse"] < 1e-10) and "vb" not in terms
    # A wrong model: the mse term is the plain mean squared error; min-SNR-γ rescales it per sample.
    zero = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    plain = diff.training_losses(zero, x0, t, noise)["mse"]
    torch.testing.assert_close(plain, _target(sched, x0, noise, t).square().flatten(1).mean(1))

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_is_min_snr_gamma_times_x0_error(prediction_type):
    """Hang et al.: whatever the parameterisation, the weighted loss equals min(SNR, γ)·||x̂0 - x0||²."""
    _, diff = _pair(beta_schedule="linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 30, 70, 99])

    def model(xt, tt):  # the output that corresponds to the (wrong) estimate x0_hat
        eps_hat = diff.predict_eps_from_x0(xt, tt, x0_hat)
        return {"epsilon": eps_hat, "v_prediction": diff.get_velocity(x0_hat, eps_hat, tt), "sample": x0_hat}[prediction_type]

    weighted = diff.training_losses(model, x0, t, noise, snr_gamma=5.0)["mse"]
    alpha_bar = torch.cumprod(1 - diff.betas, 0)[t]
    snr = alpha_bar / (1 - alpha_bar)
    expect = snr.clamp(max=5.0) * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(weighted.double(), expect, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("prediction_type, weight", [("epsilon", lambda snr: snr), ("v_prediction", lambda snr: snr + 1),
                                                     ("sample", lambda snr: torch.ones_like(snr))])
def test_plain_loss_weights_the_image_error_by_the_objectives_closed_form(prediction_type, weight):
    """||out - target||² = w(t) ||x̂0 - x0||² with w = SNR (ε), SNR + 1 (v), 1 (x0). On Stable Diffusion's
    schedule ε's weight at the noisiest step is below 0.005: the steps that decide where things go barely
    train the image an ε model predicts there, which is why the shapes presets use v-prediction."""
    _, diff = _pair(T=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    prediction_type=prediction_type)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 300, 800, 999])

    def model(xt, tt):
        eps_hat = diff.predict_eps_from_x0(xt, tt, x0_hat)
        return {"epsilon": eps_hat, "v_prediction": diff.get_velocity(x0_hat, eps_hat, tt), "sample": x0_hat}[prediction_type]

    mse = diff.training_losses(model, x0, t, noise)["mse"].double()
    snr = diff.snr[t].double()
    torch.testing.assert_close(mse, weight(snr) * (x0_hat - x0).square().flatten(1).mean(1), rtol=1e-4, atol=1e-10)
    last = float(weight(snr)[-1])
    assert (last < 0.005) if prediction_type == "epsilon" else (last >= 1)


def test_min_snr_weight_at_zero_terminal_snr_is_one():
    _, diff = _pair(T=100, beta_schedule="linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    w = diff.snr_weights(torch.tensor([98, 99]), 5.0)
    assert w[1] == 1.0 and 0 < w[0] < 1


def test_learned_variance_hybrid_loss():
    sched, diff = _pair(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 10, 50, 99])
    # Exact mean and Σ = β̃_t (values -1) make every t > 0 term of the bound exactly zero.
    terms = diff.training_losses(_oracle(sched, x0, noise, torch.full((1, 4, 1, 1), -1.0)), x0, t, noise)
    assert terms["vb"].abs().max() < 1e-4 and terms["mse"].max() < 1e-10
    # The mean is detached inside L_vlb: its gradient only reaches the variance channels.
    out = torch.randn(4, 8, 8, 8, generator=g, requires_grad=True)
    terms = diff.training_losses(lambda xt, t: out, x0, t, noise)
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0
    out.grad = None
    terms = diff.training_losses(lambda xt, t: out, x0, t, noise, vlb_weight=0.001)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * terms["vb"])
    # vb is T · L_t in bits/dim: check one t>0 term by hand against torch.distributions.
    xt = diff.q_sample(x0, t, noise)
    mean_q, _, logvar_q = diff.q_posterior_mean_variance(x0.double(), xt.double(), t)
    pm = diff.p_mean_variance(out.detach().double(), xt.double(), t)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_q, (0.5 * logvar_q).exp().expand_as(mean_q)),
        torch.distributions.Normal(pm["mean"], (0.5 * pm["log_variance"]).exp()))
    torch.testing.assert_close(terms["vb"].double(), kl.flatten(1).mean(1) / math.log(2) * 100, rtol=1e-4, atol=1e-4)


def test_t0_term_is_continuous_gaussian_nll():
    _, diff = _pair(T=10, beta_schedule="linear", variance_type="learned_range")
    g = torch.Generator().manual_seed(4)
    x0, xt = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64).tanh()
    t = torch.zeros(2, dtype=torch.long)
    pm = diff.p_mean_variance(out, xt, t)
    ref = -torch.distributions.Normal(pm["mean"], (0.5 * pm["log_variance"]).exp()).log_prob(x0)
    torch.testing.assert_close(diff.vb_terms_bpd(out, x0, xt, t), ref.flatten(1).mean(1) / math.log(2))


def test_nll_bpd_is_sum_of_terms_plus_prior():
    _, diff = _pair(T=8, beta_schedule="linear", beta_end=0.5, variance_type="learned_range")
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model = lambda xt, t: torch.cat([torch.zeros_like(xt), torch.zeros_like(xt)], 1)  # noqa: E731
    res = diff.nll_bpd(model, x0, generator=torch.Generator().manual_seed(0))
    assert res["vb"].shape == (3, 8)
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"])
    # Prior term in closed form: KL(N(sqrt(ᾱ_T) x0, 1-ᾱ_T) || N(0, 1)).
    ab = diff.alphas_cumprod[-1]
    kl = 0.5 * (ab * x0 ** 2 + (1 - ab) - 1 - torch.log(1 - ab))
    torch.testing.assert_close(res["prior_bpd"], kl.flatten(1).mean(1) / math.log(2))


def test_vlb_loss_trains_the_mean_too():
    sched, diff = _pair(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    out = torch.randn(4, 8, 8, 8, generator=g, requires_grad=True)
    terms = diff.training_losses(lambda xt, t: out, x0, t, noise, loss_type="vlb")
    torch.testing.assert_close(terms["loss"], terms["vb"])
    hybrid = diff.training_losses(lambda xt, t: out, x0, t, noise)
    torch.testing.assert_close(terms["vb"], hybrid["vb"])  # the same bound; only the gradient differs
    terms["loss"].sum().backward()
    assert out.grad[:, :4].abs().min(dim=1).values.max() > 0 and out.grad[:, 4:].abs().max() > 0
    with pytest.raises(ValueError, match="needs a learned variance"):
        _pair()[1].training_losses(lambda xt, t: out[:, :4], x0, t, noise, loss_type="vlb")
    with pytest.raises(ValueError, match="loss_type"):
        diff.training_losses(lambda xt, t: out, x0, t, noise, loss_type="hybrid2")


def test_discretized_gaussian_is_a_distribution_over_the_256_levels():
    """Its probabilities over the 256 pixel levels sum to 1, and each is the Gaussian's mass over the bin
    (float64 CDF differences, edge bins open-ended)."""
    g = torch.Generator().manual_seed(0)
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean = (torch.rand(5, 1, generator=g, dtype=torch.float64) * 2.4 - 1.2)
    logvar = torch.log(torch.tensor([1e-4, 1e-3, 0.01, 0.1, 1.0], dtype=torch.float64)).unsqueeze(1)
    p = torch.exp(-discretized_gaussian_nll(levels.expand(5, 256), mean, logvar))
    torch.testing.assert_close(p.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-9)
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    upper = torch.where(levels < 1 - 1e-6, normal.cdf(levels + 1 / 255), torch.ones(()))
    lower = torch.where(levels > -1 + 1e-6, normal.cdf(levels - 1 / 255), torch.zeros(()))
    torch.testing.assert_close(p, (upper - lower).clamp(min=1e-12), rtol=1e-6, atol=1e-15)
    # Far in the tails values and gradients stay finite: a bin's mass is floored at 1e-12.
    x = torch.randint(0, 256, (2000,), generator=g).float() / 127.5 - 1
    mean = (torch.randn(2000, generator=g) * 3).requires_grad_(True)
    logvar = torch.linspace(-25, 3, 2000).requires_grad_(True)
    nll = discretized_gaussian_nll(x, mean, logvar)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and nll.max() <= -math.log(1e-12) + 1e-4
    assert torch.isfinite(mean.grad).all() and torch.isfinite(logvar.grad).all()


def test_pixel_decoder_term_uses_the_discretized_gaussian():
    sched = DDPMScheduler(num_train_timesteps=10, clip_sample=True, variance_type="learned_range")
    diff = GaussianDiffusion.from_scheduler_config(sched.config, discrete_decoder=True)
    assert diff.clip_x0 and diff.discrete_decoder
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1
    xt, out = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    pm = diff.p_mean_variance(out, xt, t)
    assert pm["pred_x0"].abs().max() <= 1
    ref = discretized_gaussian_nll(x0, pm["mean"], pm["log_variance"]).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(diff.vb_terms_bpd(out, x0, xt, t), ref)


def test_strided_nll_estimate_is_unbiased_and_stride_one_is_the_full_bound():
    _, diff = _pair(T=40, beta_schedule="linear", beta_end=0.2, variance_type="learned_range")
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # A deterministic "network" whose terms vary with t and x_t, so every term differs.
    model = lambda xt, t: torch.cat([0.3 * xt, torch.tanh(xt + t.view(-1, 1, 1, 1) / 40)], 1)  # noqa: E731
    full = diff.nll_bpd(model, x0, generator=torch.Generator().manual_seed(0))
    assert full["vb"].shape == (2, 40)
    torch.testing.assert_close(full["total_bpd"], full["vb"].sum(1) + full["prior_bpd"])
    torch.testing.assert_close(full["decoder_bpd"], full["vb"][:, 0])
    # Averages of strided estimates over many draws approach the full bound's expectation (itself estimated
    # here by averaging full bounds over the same number of noise draws).
    g = torch.Generator().manual_seed(1)
    strided = torch.stack([diff.nll_bpd(model, x0, generator=g, stride=8)["total_bpd"] for _ in range(200)])
    fulls = torch.stack([diff.nll_bpd(model, x0, generator=g)["total_bpd"] for _ in range(40)])
    gap = (strided.mean(0) - fulls.mean(0)).abs()
    se = (strided.var(0) / 200 + fulls.var(0) / 40).sqrt()
    assert (gap < 4 * se + 1e-9).all(), (gap, se)
    assert diff.nll_bpd(model, x0, generator=g, stride=8)["vb"].shape == (2, 8 + 4)  # t < 8, then 8, 16, 24, 32
    with pytest.raises(ValueError, match="stride"):
        diff.nll_bpd(model, x0, stride=0)


def test_nll_bound_is_the_same_whatever_the_number_of_timesteps_per_network_pass():
    _, diff = _pair(T=40, beta_schedule="linear", beta_end=0.2, variance_type="learned_range")
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shift = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)  # a per-sample input, as a caption's context is
    model = lambda xt, t, c: torch.cat([0.3 * xt + c.view(-1, 1, 1, 1), torch.tanh(xt + t.view(-1, 1, 1, 1) / 40)], 1)  # noqa: E731
    for stride in (1, 8):
        runs = [diff.nll_bpd(model, x0, {"c": shift}, generator=torch.Generator().manual_seed(0), stride=stride,
                             timesteps_per_pass=k) for k in (1, 7, None)]
        for other in runs[1:]:
            for key in ("total_bpd", "vb", "decoder_bpd"):
                torch.testing.assert_close(other[key], runs[0][key])
    # One term by hand, the way a per-timestep loop computes it: t = 0 with the generator's first noise draw.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=x0.dtype)
    t = torch.zeros(3, dtype=torch.long)
    xt = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(runs[0]["decoder_bpd"], diff.vb_terms_bpd(model(xt, t, shift), x0, xt, t))
    with pytest.raises(ValueError, match="timesteps_per_pass"):
        diff.nll_bpd(model, x0, {"c": shift}, timesteps_per_pass=0)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(make_betas("linear", 10), prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        GaussianDiffusion(make_betas("linear", 10), variance_type="learned_log")
    _, diff = _pair(T=10, variance_type="learned_range")
    with pytest.raises(ValueError, match="8 output channels"):
        diff.split_output(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))


def test_warns_for_eps_prediction_with_near_one_terminal_beta(caplog):
    with caplog.at_level("WARNING", logger="ldm.diffusion.gaussian"):
        _pair(T=1000, beta_schedule="squaredcos_cap_v2")
    assert "amplifies" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.diffusion.gaussian"):
        _pair(T=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        _pair(T=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    assert "amplifies" not in caplog.text

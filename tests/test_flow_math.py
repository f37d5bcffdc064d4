"""Flow-matching formulas, each against its written definition (SPEC), with numbers worked out independently."""

import math

import pytest
import torch

from trainer import flow
from trainer.flow import FlowConfig


def test_flux_shift_mu_is_linear_from_256_to_4096_tokens():
    assert flow.flux_shift_mu(256) == pytest.approx(0.5)
    assert flow.flux_shift_mu(4096) == pytest.approx(1.15)
    assert flow.flux_shift_mu((1024 // 16) ** 2) == pytest.approx(1.15)  # 1024x1024 image
    assert flow.flux_shift_mu(2176) == pytest.approx(0.825)  # halfway


def test_flux_shift_at_1024_is_an_effective_shift_of_about_3_158():
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = flow.time_shift(1.15, s)
    shift = math.exp(1.15)
    assert torch.allclose(sigma, shift * s / (1 + (shift - 1) * s))
    assert shift == pytest.approx(3.158, abs=1e-3)


@pytest.mark.parametrize("mode", ["uniform", "sigmoid", "shift", "flux_shift", "sigma"])
def test_sampled_sigmas_follow_their_formula(mode):
    g = torch.Generator().manual_seed(0)
    n, u = torch.randn(1000, generator=g), torch.rand(1000, generator=g)
    cfg = FlowConfig(timestep_sampling=mode, sigmoid_scale=1.5, discrete_flow_shift=3.1582)
    sigma = flow.sample_sigmas(cfg, n, u, 64, 96)
    s = torch.sigmoid(1.5 * n)
    if mode == "uniform":
        expected = u
    elif mode == "sigmoid":
        expected = s
    elif mode == "shift":
        expected = 3.1582 * s / (1 + 2.1582 * s)
    elif mode == "flux_shift":
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((64 // 2) * (96 // 2) - 256)
        expected = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
    else:
        index = torch.floor(1000 * u)
        t = (1000 - index) / 1000
        expected = 3.1582 * t / (1 + 2.1582 * t)
    assert torch.allclose(sigma.double(), expected.double(), atol=1e-6)
    assert ((sigma > 0) & (sigma <= 1)).all()


def test_sigma_sampling_weighting_schemes():
    n = torch.tensor([0.0, 1.0])
    u = torch.tensor([0.25, 0.75])
    logit = flow._density(FlowConfig(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=2.0), n, u)
    assert torch.allclose(logit, torch.sigmoid(0.5 + 2.0 * n))
    mode = flow._density(FlowConfig(weighting_scheme="mode", mode_scale=1.29), n, u)
    assert torch.allclose(mode, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))


def test_noising_target_and_prediction_types():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    xt = flow.noisy_latents(x0, eps, sigma)
    assert torch.allclose(xt[1], 0.1 * x0[1] + 0.9 * eps[1])
    velocity = eps - x0
    raw = FlowConfig(model_prediction_type="raw")
    assert torch.equal(flow.target(x0, eps, raw), velocity)
    assert torch.equal(flow.apply_prediction_type(velocity, xt, sigma, raw)[0], velocity)
    additive = FlowConfig(model_prediction_type="additive")
    assert torch.allclose(flow.apply_prediction_type(velocity, xt, sigma, additive)[0], velocity + xt)
    scaled = FlowConfig(model_prediction_type="sigma_scaled")
    prediction, weighting = flow.apply_prediction_type(velocity, xt, sigma, scaled)
    # a perfect velocity, sigma-scaled, is the clean latent: that is the target we use (sd-scripts' defect fixed)
    assert torch.allclose(prediction, x0, atol=1e-5) and torch.equal(flow.target(x0, eps, scaled), x0)
    assert torch.equal(weighting, torch.ones(2, 1, 1, 1))


def test_loss_weighting_and_losses():
    s = torch.tensor([0.25, 0.5])
    assert torch.allclose(flow.loss_weighting("sigma_sqrt", s), 1 / s**2)
    assert torch.allclose(flow.loss_weighting("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]])
    c = torch.tensor([0.5])
    assert torch.allclose(flow.elementwise_loss(a, b, "l2"), torch.tensor([[1.0, 4.0]]))
    assert torch.allclose(flow.elementwise_loss(a, b, "l1"), torch.tensor([[1.0, 2.0]]))
    huber = 2 * 0.5 * (torch.sqrt(torch.tensor([1.0, 4.0]) + 0.25) - 0.5)
    assert torch.allclose(flow.elementwise_loss(a, b, "huber", c), huber[None])
    assert torch.allclose(flow.elementwise_loss(a, b, "smooth_l1", c), (huber / 0.5)[None])


def test_huber_c_schedules():
    s = torch.tensor([0.0, 0.5, 1.0])
    constant = FlowConfig(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0)
    assert torch.allclose(flow.huber_c(constant, s), torch.full((3,), 0.4))
    exponential = FlowConfig(loss_type="huber", huber_schedule="exponential", huber_c=0.1)
    assert torch.allclose(flow.huber_c(exponential, s), torch.tensor([1.0, 0.1**0.5, 0.1]))
    assert flow.huber_c(FlowConfig(loss_type="l2"), s) is None
    with pytest.raises(ValueError, match="huber_schedule 'snr'"):
        FlowConfig(loss_type="huber")  # sd-scripts' default schedule cannot work for FLUX


def test_batch_loss_reduces_like_sd_scripts():
    pred, tgt = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    tgt[1] *= 2
    mask = torch.ones(2, 1, 2, 2)
    mask[1, :, 0] = 0  # half of sample 2 masked out
    weights = torch.tensor([1.0, 0.5])
    loss = flow.batch_loss(pred, tgt, FlowConfig(), torch.rand(2), None, mask, weights)
    assert loss.item() == pytest.approx((1.0 * 1.0 + 0.5 * (4.0 * 0.5)) / 2)


@pytest.mark.parametrize("option,value", [("timestep_sampling", "linear"), ("model_prediction_type", "eps"),
                                          ("weighting_scheme", "snr"), ("loss_type", "mse")])
def test_unknown_choices_name_the_option(option, value):
    with pytest.raises(ValueError, match=f"{option}: expected one of"):
        FlowConfig(**{option: value})


def test_preview_schedule():
    t = flow.sampling_schedule(4, 256)
    assert t[0] == pytest.approx(1.0) and t[-1] == 0.0 and len(t) == 5
    raw = [1.0, 0.75, 0.5, 0.25]
    assert t[1:4] == pytest.approx([math.exp(0.5) / (math.exp(0.5) + 1 / r - 1) for r in raw[1:]])
    assert flow.sampling_schedule(4, 256, shift=False) == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_ip_noise_perturbation_is_gamma_times_a_standard_normal_per_sample():
    assert flow.input_perturbation(FlowConfig(), 1, 2, [0, 1], (4, 8, 8)) is None
    assert flow.input_perturbation(FlowConfig(ip_noise_gamma=0.0), 1, 2, [0, 1], (4, 8, 8)) is None
    small = flow.input_perturbation(FlowConfig(ip_noise_gamma=0.1), 1, 2, [0, 1, 2, 3], (4, 16, 16))
    large = flow.input_perturbation(FlowConfig(ip_noise_gamma=0.3), 1, 2, [0, 1, 2, 3], (4, 16, 16))
    assert small.shape == (4, 4, 16, 16)
    assert torch.allclose(large, 3 * small, atol=1e-6)  # the same xi, scaled by gamma
    assert (small / 0.1).std().item() == pytest.approx(1.0, abs=0.05)
    assert not torch.allclose(small[0], small[1])  # each sample draws its own xi
    # a sample's draw depends on its position in the whole batch, not on which process holds it
    alone = flow.input_perturbation(FlowConfig(ip_noise_gamma=0.1), 1, 2, [2], (4, 16, 16))
    assert torch.equal(alone[0], small[2])
    assert not torch.allclose(flow.input_perturbation(FlowConfig(ip_noise_gamma=0.1), 1, 3, [2], (4, 16, 16)), alone)


def test_ip_noise_random_strength_draws_one_gamma_per_step_below_the_maximum():
    plain = FlowConfig(ip_noise_gamma=0.5)
    random = FlowConfig(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True)
    ratios = []
    for step in range(40):
        full = flow.input_perturbation(plain, 7, step, [0, 1, 5], (4, 4, 4))
        drawn = flow.input_perturbation(random, 7, step, [0, 1, 5], (4, 4, 4))
        ratio = drawn / full  # the same xi; one gamma / 0.5 for the whole batch
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5)
        ratios.append(ratio.flatten()[0].item())
        assert torch.equal(flow.input_perturbation(random, 7, step, [5], (4, 4, 4))[0], drawn[2])
    assert all(0 <= r < 1 for r in ratios) and max(ratios) - min(ratios) > 0.5

"""Flow-matching math for FLUX.1 as pure functions: latent packing and position ids, timestep sampling, noising,
targets, prediction types, loss weighting and the loss itself. Formulas are sd-scripts' (see the README for the
one place where we differ: the target of `sigma_scaled`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config.flow import NUM_TRAIN_TIMESTEPS, FlowConfig

# ------------------------------------------------------------------------------------------------ packing

def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4]: 2x2 patches, channel index c*4 + row*2 + col, tokens row-major."""
    b, c, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")
    x = latents.reshape(b, c, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (height // 2) * (width // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width` (latent pixels, both even)."""
    b, _, channels = packed.shape
    x = packed.reshape(b, height // 2, width // 2, channels // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids [B, (h/2)*(w/2), 3] = (0, row, column) of each packed token."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.stack(torch.broadcast_tensors(torch.zeros((), device=device, dtype=dtype), rows[:, None],
                                              cols[None, :]), dim=-1)
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None, dtype=torch.float32) -> Tensor:
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)


def guidance_vector(batch: int, scale: float, device=None) -> Tensor:
    return torch.full((batch,), float(scale), device=device)


# ------------------------------------------------------------------------------------------------ timesteps

def flux_shift_mu(image_tokens: int, base: float = 0.5, top: float = 1.15) -> float:
    """mu linear in the packed image token count: 0.5 at 256 tokens, 1.15 at 4096 (1024x1024)."""
    slope = (top - base) / (4096 - 256)
    return slope * image_tokens + (base - slope * 256)


def time_shift(mu: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def shifted(sigma: Tensor, shift: float) -> Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def _density(cfg: FlowConfig, n: Tensor, u: Tensor) -> Tensor:
    """u in [0, 1) for the `sigma` sampling, from a normal draw `n` and a uniform draw `u` (per sample)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(cfg: FlowConfig, n: Tensor, u: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """sigma in (0, 1) per sample from one standard-normal `n` and one uniform `u` draw per sample (drawn by the
    caller, so every sample's randomness is its own and reproducible)."""
    mode = cfg.timestep_sampling
    if mode == "uniform":
        return u
    if mode == "sigmoid":
        return torch.sigmoid(cfg.sigmoid_scale * n)
    if mode == "shift":
        return shifted(torch.sigmoid(cfg.sigmoid_scale * n), cfg.discrete_flow_shift)
    if mode == "flux_shift":
        mu = flux_shift_mu((latent_height // 2) * (latent_width // 2))
        return time_shift(mu, torch.sigmoid(cfg.sigmoid_scale * n))
    # "sigma": a 1000-step schedule t = 1000..1, shifted; index floor(1000 u)
    index = (_density(cfg, n, u) * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    t = (NUM_TRAIN_TIMESTEPS - index).to(torch.float64) / NUM_TRAIN_TIMESTEPS
    return shifted(t, cfg.discrete_flow_shift).to(n.dtype)


def noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise


_IP_NOISE_STREAM, _IP_STRENGTH_STREAM = 1, 2  # generator streams apart from the step's noise and timestep draws


def _generator(seed: int, step: int, position: int, stream: int) -> torch.Generator:
    key = (seed * 1_000_003 + step * 65_537 + position) % 2**61
    return torch.Generator().manual_seed((key * 8 + stream) % 2**63)


def input_perturbation(cfg: FlowConfig, seed: int, step: int, positions: list[int], shape: tuple) -> Tensor | None:
    """sd-scripts' --ip_noise_gamma: gamma * xi, xi standard normal per sample (from its own generator, like the
    step's noise), added to the noise that makes the model's input (noisy_latents), not to the target's noise. With
    --ip_noise_gamma_random_strength gamma is drawn uniformly in [0, ip_noise_gamma) once per step for the whole
    batch (from a generator every process shares)."""
    if not cfg.ip_noise_gamma:
        return None
    gamma = float(cfg.ip_noise_gamma)
    if cfg.ip_noise_gamma_random_strength:
        gamma *= torch.rand((), generator=_generator(seed, step, 0, _IP_STRENGTH_STREAM)).item()
    xi = [torch.randn(shape, generator=_generator(seed, step, position, _IP_NOISE_STREAM)) for position in positions]
    return gamma * torch.stack(xi)


# ------------------------------------------------------------------------------------------------ prediction and loss

def target(latents: Tensor, noise: Tensor, cfg: FlowConfig) -> Tensor:
    """The velocity noise - latents; for `sigma_scaled`, whose prediction estimates the clean latents, the clean
    latents themselves (sd-scripts keeps noise - latents there, a defect)."""
    if cfg.model_prediction_type == "sigma_scaled":
        return latents
    return noise - latents


def apply_prediction_type(output: Tensor, noisy: Tensor, sigmas: Tensor,
                          cfg: FlowConfig) -> tuple[Tensor, Tensor | None]:
    """The prediction compared with `target`, and the loss weighting (sigma_scaled only)."""
    if cfg.model_prediction_type == "raw":
        return output, None
    if cfg.model_prediction_type == "additive":
        return output + noisy, None
    s = sigmas.view(-1, *([1] * (output.ndim - 1)))
    return output * (-s) + noisy, loss_weighting(cfg.weighting_scheme, s)


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def huber_c(cfg: FlowConfig, sigmas: Tensor) -> Tensor | None:
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    if cfg.huber_schedule == "exponential":
        alpha = -math.log(cfg.huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * sigmas * NUM_TRAIN_TIMESTEPS) * cfg.huber_scale
    return torch.full_like(sigmas, cfg.huber_c * cfg.huber_scale)


def elementwise_loss(prediction: Tensor, target_: Tensor, loss_type: str, c: Tensor | None = None) -> Tensor:
    diff = prediction.float() - target_.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    c = c.view(-1, *([1] * (diff.ndim - 1)))
    smooth = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def batch_loss(prediction: Tensor, target_: Tensor, cfg: FlowConfig, sigmas: Tensor, weighting: Tensor | None = None,
               mask: Tensor | None = None, sample_weights: Tensor | None = None) -> Tensor:
    """fp32 loss per element, x weighting x mask, mean over all but the batch, x per-sample weight, mean."""
    loss = elementwise_loss(prediction, target_, cfg.loss_type, huber_c(cfg, sigmas))
    if weighting is not None:
        loss = loss * weighting
    if mask is not None:
        loss = loss * mask
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights
    return loss.mean()


def alpha_mask_for_latents(mask: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """[B, H, W] pixel mask in [0, 1] -> [B, 1, h, w] at latent resolution (area average)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask[:, None].float(), (latent_height, latent_width))


def sampling_schedule(steps: int, image_tokens: int, shift: bool = True) -> list[float]:
    """Preview sampling times 1 -> 0, time-shifted with mu from the token count (dev; schnell: unshifted)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        t = torch.cat([time_shift(flux_shift_mu(image_tokens), t[:-1]), t[-1:]])
    return t.tolist()

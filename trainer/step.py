"""One batch -> its loss, read as a sequence of the pure functions in `flow.py`.

Each sample's noise and timestep come from a generator seeded by (seed, step, position in the whole batch), so a
resumed run, or several processes splitting each batch, compute exactly what one uninterrupted process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import flow
from .config import FlowConfig
from .lora import LoRANetwork


@dataclass(frozen=True)
class StepContext:
    """What a training step reads; encoders are None when their outputs are cached and they are not trained."""
    flux: torch.nn.Module
    network: LoRANetwork
    flow: FlowConfig
    seed: int
    weight_dtype: torch.dtype
    device: torch.device
    apply_t5_attn_mask: bool = False
    ae: torch.nn.Module | None = None
    clip_l: torch.nn.Module | None = None
    t5: torch.nn.Module | None = None
    train_clip: bool = False
    train_t5: bool = False


class TrainStep(torch.nn.Module):
    """What DistributedDataParallel wraps: only the LoRA network is registered (its gradients are synchronised);
    the frozen transformer is reached through the LoRA hooks, never copied or broadcast."""

    def __init__(self, context: StepContext):
        super().__init__()
        self.network = context.network
        self.__dict__["context"] = context

    def forward(self, batch, step: int) -> Tensor:
        return loss(self.context, batch, step)


def sample_noise(seed: int, step: int, positions: list[int], shape: tuple,
                 posterior: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per sample: the noise, the normal and uniform draws for its timestep, and (when latents are encoded now)
    the draw for sampling the autoencoder's posterior; each from its own generator."""
    noises, normals, uniforms, posteriors = [], [], [], []
    for position in positions:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step * 65_537 + position) % 2**63)
        normals.append(torch.randn((), generator=g))
        uniforms.append(torch.rand((), generator=g))
        noises.append(torch.randn(shape, generator=g))
        if posterior:
            posteriors.append(torch.randn(shape, generator=g))
    return (torch.stack(noises), torch.stack(normals), torch.stack(uniforms),
            torch.stack(posteriors) if posterior else None)


def text_conditioning(ctx: StepContext, batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """pooled [B, 768], T5 [B, L, 4096], T5 mask [B, L] for the batch: cached, or encoded now (with gradients
    through an encoder whose LoRA is being trained)."""
    if batch.text is not None:
        pooled, hidden, mask = (t.to(ctx.device) for t in batch.text)
    else:
        with torch.set_grad_enabled(ctx.train_t5):
            ids, mask = ctx.t5.tokenize(batch.captions)
            hidden = ctx.t5(ids, mask if ctx.apply_t5_attn_mask else None)
        mask = mask.to(ctx.device)
        pooled = None
    if pooled is None or ctx.train_clip:
        with torch.set_grad_enabled(ctx.train_clip):
            pooled = ctx.clip_l.encode(batch.captions)
    return pooled, hidden, mask


def loss(ctx: StepContext, batch, step: int, sigma: float | None = None) -> Tensor:
    """The batch's loss at step `step`; `sigma` fixes every sample's noise level (validation) instead of drawing it."""
    cfg, device = ctx.flow, ctx.device
    encode_now = batch.latents is None
    if encode_now:
        _, _, height, width = batch.images.shape
        down = ctx.ae.params.downscale  # image pixels per latent pixel (FLUX's autoencoder: 8)
        shape = (ctx.ae.params.z_channels, height // down, width // down)
    else:
        shape = tuple(batch.latents.shape[1:])
    noise, normal, uniform, posterior = sample_noise(ctx.seed, step, batch.positions, shape, posterior=encode_now)
    if encode_now:
        with torch.no_grad():
            latents = ctx.ae.encode(batch.images.to(device), noise=posterior.to(device)).float()
    else:
        latents = batch.latents.to(device, torch.float32)
    b, _, h, w = latents.shape
    noise = noise.to(device)
    if sigma is None:
        sigmas = flow.sample_sigmas(cfg, normal, uniform, h, w).to(device)
    else:
        sigmas = torch.full((b,), float(sigma), device=device)
    perturbation = flow.input_perturbation(cfg, ctx.seed, step, batch.positions, shape)  # --ip_noise_gamma
    noisy = flow.noisy_latents(latents, noise if perturbation is None else noise + perturbation.to(device), sigmas)
    pooled, hidden, mask = text_conditioning(ctx, batch)
    ctx.network.set_multiplier(batch.network_multiplier)
    dtype = ctx.weight_dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        output = ctx.flux(flow.pack_latents(noisy).to(dtype), flow.image_ids(b, h, w, device=device),
                          hidden.to(dtype), flow.text_ids(b, hidden.shape[1], device=device), sigmas,
                          pooled.to(dtype), flow.guidance_vector(b, cfg.guidance_scale, device),
                          mask if ctx.apply_t5_attn_mask else None)
    output = flow.unpack_latents(output.float(), h, w)
    prediction, weighting = flow.apply_prediction_type(output, noisy, sigmas, cfg)
    alpha = None
    if batch.alpha_masks is not None:
        alpha = flow.alpha_mask_for_latents(batch.alpha_masks.to(device), h, w)
    loss = flow.batch_loss(prediction, flow.target(latents, noise, cfg), cfg, sigmas, weighting, alpha,
                           batch.loss_weights.to(device))
    return loss if batch.loss_scale == 1.0 else loss * batch.loss_scale

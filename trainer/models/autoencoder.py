"""FLUX.1 autoencoder (the `ae.safetensors` of BFL), configuration read off tensor shapes.

`encode` returns the latent the transformer sees, scale * (z - shift); `decode` inverts that first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


@dataclass(frozen=True)
class AutoEncoderParams:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = SCALE_FACTOR
    shift_factor: float = SHIFT_FACTOR

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: 2 per downsampling level (FLUX's autoencoder has 3 of them, so 8)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], config: Mapping | None = None) -> "AutoEncoderParams":
        def shape(key: str) -> Sequence[int]:
            if key not in shapes:
                raise KeyError(f"tensor '{key}' is missing; a FLUX autoencoder has it")
            return shapes[key]

        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        if not levels:
            raise KeyError("no 'encoder.down.N' tensors; a FLUX autoencoder has them")
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
        config = dict(config or {})
        return cls(
            in_channels=in_channels,
            out_ch=shape("decoder.conv_out.weight")[0],
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=len(blocks),
            z_channels=shape("encoder.conv_out.weight")[0] // 2,
            scale_factor=float(config.get("scale_factor", SCALE_FACTOR)),
            shift_factor=float(config.get("shift_factor", SHIFT_FACTOR)),
        )


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.flatten(2).transpose(1, 2)[:, None]

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out[:, 0].transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # FLUX has no attention at any resolution level; kept for the key layout
    if resample is not None:
        level.add_module(name, resample)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = p.ch
        for i, mult in enumerate(p.ch_mult):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(channels, p.ch * mult))
                channels = p.ch * mult
            last = i == len(p.ch_mult) - 1
            self.down.append(_level(blocks, None if last else Downsample(channels), "downsample"))
        self.mid = _mid(channels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        channels = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, channels, 3, padding=1)
        self.mid = _mid(channels)
        levels = []
        for i in reversed(range(len(p.ch_mult))):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, p.ch * p.ch_mult[i]))
                channels = p.ch * p.ch_mult[i]
            levels.insert(0, _level(blocks, Upsample(channels) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(channels)
        self.conv_out = nn.Conv2d(channels, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> latents scale * (z - shift), [B, z_channels, H/8, W/8].
        `sample` draws z from the posterior (as training does; with `noise` given, z = mean + std * noise);
        otherwise z is its mean."""
        mean, logvar = self.encoder(x.to(self.dtype)).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar)
            if noise is None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.dtype)
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.dtype) / self.params.scale_factor + self.params.shift_factor
        return self.decoder(z)

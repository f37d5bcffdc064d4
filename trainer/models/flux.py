"""FLUX.1 transformer (dev and schnell), the same function as black-forest-labs/flux.

Every size is a field of `FluxParams`; `FluxParams.from_shapes` reads them off a checkpoint's tensor shapes, so a
tiny test model and the 12B model are built by exactly the same code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

TIME_EMBED_DIM = 256


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_hidden_dim: int = 12288
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {list(self.axes_dim)} must be even sizes summing to the head size "
                             f"{self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embed else "schnell"

    @classmethod
    def dev(cls) -> "FluxParams":
        return cls()

    @classmethod
    def schnell(cls) -> "FluxParams":
        return cls(guidance_embed=False)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], config: Mapping | None = None) -> "FluxParams":
        """Infer every size from BFL-layout tensor shapes. `config` (e.g. a file's metadata) may supply the two
        values that shapes cannot show: `axes_dim` and `theta`."""

        def shape(key: str) -> Sequence[int]:
            if key not in shapes:
                raise KeyError(f"tensor '{key}' is missing; a FLUX.1 transformer has it")
            return shapes[key]

        hidden, in_channels = shape("img_in.weight")
        first = "double_blocks.0.img_attn.norm.query_norm.scale"
        if first not in shapes:
            first = "single_blocks.0.norm.query_norm.scale"
        head_dim = shape(first)[0]
        if "double_blocks.0.img_mlp.0.weight" in shapes:
            mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        else:
            mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        config = dict(config or {})
        axes_dim = tuple(config.get("axes_dim") or default_axes_dim(head_dim))
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_hidden_dim=mlp_hidden,
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=axes_dim,
            theta=int(config.get("theta", 10_000)),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits each head's rotary dims 1/8 : 7/16 : 7/16 over (unused, row, column): [16, 56, 56] at 128."""
    first = 2 * round(head_dim / 16)
    rest = head_dim - first
    second = 2 * (rest // 4)
    return first, second, rest - second


def _count_blocks(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    if indices and indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise KeyError(f"{prefix} {missing} are missing (found {len(indices)} of {max(indices) + 1})")
    return len(indices)


# ----------------------------------------------------------------------------------------------- math

def timestep_embedding(t: Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of t in 0..1 (scaled by 1000 as the reference does), [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for positions `pos` [..., n]."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angles = pos.double()[..., None] * omega
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    pairs = x.float().unflatten(-1, (-1, 1, 2))
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask: Tensor | None) -> Tensor:
    """q, k, v: [B, H, L, D]; mask: boolean key mask broadcastable to [B, H, L, L] (True = attend)."""
    x = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=mask)
    return x.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] -> three [B, H, L, D]."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


# --------------------------------------------------------------------------------------------- layers

class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype (fp8) and is upcast for each call; a "scaled fp8"
    weight carries a `weight_scale` buffer that the upcast multiplies in. `fp8_compute`, when set on a layer
    (trainer/fp8.py does, per block), computes it instead while its weight is fp8: one upcast per block, or fp8
    matmuls."""

    fp8_compute: Callable[["Linear", Tensor], Tensor] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if self.fp8_compute is not None and weight.dtype in FP8_DTYPES:
            return self.fp8_compute(self, x)
        scale = self._buffers.get("weight_scale")  # absent on nn.Linears converted in place (T5)
        autocast = torch.is_autocast_enabled(x.device.type)
        if weight.dtype in FP8_DTYPES or (weight.dtype != x.dtype and not autocast):
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            weight = weight.to(dtype)
            if scale is not None:
                weight = weight * scale.to(dtype)
            if bias is not None and not autocast:
                bias = bias.to(dtype)
        return F.linear(x, weight, bias)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(like), self.key_norm(k).to(like)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """shift, scale, gate (once, or twice for a double block) from the conditioning vector."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = Linear(dim, self.chunks * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly."""

    def __init__(self, p: FluxParams):
        super().__init__()
        self.num_heads = p.num_heads
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(p.hidden_size, double=True))
            self.add_module(f"{stream}_norm1", _layer_norm(p.hidden_size))
            self.add_module(f"{stream}_attn", SelfAttention(p.hidden_size, p.num_heads, p.qkv_bias))
            self.add_module(f"{stream}_norm2", _layer_norm(p.hidden_size))
            self.add_module(f"{stream}_mlp", _mlp(p.hidden_size, p.mlp_hidden_dim))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        img_mod = self.img_mod(vec)
        txt_mod = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_mod[1]) * self.img_norm1(img) + img_mod[0])
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_mod[1]) * self.txt_norm1(txt) + txt_mod[0])
        joint = attention(
            torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2),
            pe, mask,
        )
        txt_out, img_out = joint[:, : txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_mod[2] * self.img_attn.proj(img_out)
        img = img + img_mod[5] * self.img_mlp((1 + img_mod[4]) * self.img_norm2(img) + img_mod[3])
        txt = txt + txt_mod[2] * self.txt_attn.proj(txt_out)
        txt = txt + txt_mod[5] * self.txt_mlp((1 + txt_mod[4]) * self.txt_norm2(txt) + txt_mod[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt, img] with attention and MLP computed in parallel from one projection."""

    def __init__(self, p: FluxParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.hidden_size = p.hidden_size
        self.mlp_hidden_dim = p.mlp_hidden_dim
        self.linear1 = Linear(p.hidden_size, 3 * p.hidden_size + p.mlp_hidden_dim)
        self.linear2 = Linear(p.hidden_size + p.mlp_hidden_dim, p.hidden_size)
        self.norm = QKNorm(p.head_dim)
        self.pre_norm = _layer_norm(p.hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(p.hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * self.pre_norm(x) + shift).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe, mask), self.mlp_act(mlp)), dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


# ---------------------------------------------------------------------------------------------- model

class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.img_in = Linear(params.in_channels, params.hidden_size)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, params.hidden_size)
        self.txt_in = Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(params) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(params) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)
        self.gradient_checkpointing = False
        # Called as block_runner(kind, index, block, *args) for every block (see trainer/memory.py); None: plain
        # calls, checkpointed when gradient_checkpointing is set.
        self.block_runner: Callable[..., Any] | None = None

    def position_embedding(self, ids: Tensor) -> Tensor:
        """ids [B, L, n_axes] -> rotary matrices [B, 1, L, head_dim/2, 2, 2]."""
        p = self.params
        return torch.cat([rope(ids[..., i], p.axes_dim[i], p.theta) for i in range(ids.shape[-1])], dim=-3)[:, None]

    def _run(self, kind: str, index: int, block: nn.Module, *args):
        if self.block_runner is not None:
            return self.block_runner(kind, index, block, *args)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """img [B, N, in_channels] packed latents; txt [B, L, context_in_dim]; timesteps and guidance in 0..1
        and 0..~10 (scaled by 1000 inside); txt_attention_mask [B, L], nonzero = keep. Returns [B, N, out]."""
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 model has a guidance embedding (dev): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.position_embedding(torch.cat((txt_ids, img_ids), dim=1))
        mask = None
        if txt_attention_mask is not None:
            keep_img = torch.ones(img.shape[0], img.shape[1], dtype=torch.bool, device=img.device)
            mask = torch.cat((txt_attention_mask.bool(), keep_img), dim=1)[:, None, None, :]

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run("double", i, block, img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run("single", i, block, x, vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1]:], vec)

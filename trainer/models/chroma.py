"""Chroma (lodestones' Chroma1-Base/HD): FLUX.1-schnell's transformer without CLIP-L, whose per-block modulation
layers are replaced by one small network, the "approximator" (`distilled_guidance_layer`), that computes every
block's shift/scale/gate vectors from the timestep and guidance at once.

The key layout is the one Chroma checkpoints and ComfyUI use: FLUX's BFL keys minus `time_in`, `vector_in`,
`guidance_in`, every `*_mod.lin` / `modulation.lin` and `final_layer.adaLN_modulation`, plus
`distilled_guidance_layer.{in_proj, layers.N.{in,out}_layer, norms.N.scale, out_proj}`. The blocks are FLUX's own
(trainer/models/flux.py): their modulation layers are swapped for parameter-free ones that hand out the
approximator's vectors, so the block math, LoRA targets, block runners and block swap are FLUX's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .flux import (
    DoubleStreamBlock,
    Flux,
    LastLayer,
    Linear,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
    _count_blocks,
    default_axes_dim,
    timestep_embedding,
)

# sd-scripts' Chroma lets each sample attend to this many padding tokens after its caption (as Chroma was trained)
ATTEND_PADDING_TOKENS = 1


@dataclass(frozen=True)
class ChromaParams:
    in_channels: int = 64
    out_channels: int = 64
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_hidden_dim: int = 12288
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    approximator_in_dim: int = 64
    approximator_hidden_dim: int = 5120
    approximator_layers: int = 5

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {list(self.axes_dim)} must be even sizes summing to the head size "
                             f"{self.head_dim}")
        if self.approximator_in_dim % 4:
            raise ValueError(f"the approximator's input width {self.approximator_in_dim} must be a multiple of 4 "
                             "(timestep, guidance and vector index embeddings take 1/4, 1/4 and 1/2 of it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def variant(self) -> str:
        return "chroma"

    @property
    def guidance_embed(self) -> bool:
        """Whether the model takes a guidance value: Chroma does (through its approximator; it trains with 0), so
        code that sizes or shifts for a guidance-distilled FLUX (512 T5 tokens, shifted sampling) treats it so."""
        return True

    @property
    def modulation_count(self) -> int:
        """Vectors the approximator computes: 3 per single block, 2 x 6 per double block, 2 for the last layer."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2

    # Where each consumer's vectors start in the approximator's output, the order Chroma was trained with: every
    # single block (3 each), the double blocks' image streams (6 each), their text streams (6 each), the last layer.
    def single_offset(self, index: int) -> int:
        return 3 * index

    def double_offsets(self, index: int) -> tuple[int, int]:
        image = 3 * self.depth_single_blocks + 6 * index
        return image, image + 6 * self.depth

    @property
    def final_offset(self) -> int:
        return 3 * self.depth_single_blocks + 12 * self.depth

    def parameter_counts(self) -> tuple[int, int, int]:
        """(one double block, one single block, everything else): the layers' shapes' arithmetic, for the memory
        plan (FLUX's blocks without their modulation layers; the approximator instead of FLUX's embedders)."""
        h, mlp, head = self.hidden_size, self.mlp_hidden_dim, self.head_dim
        bias = 1 if self.qkv_bias else 0
        stream = h * 3 * h + 3 * h * bias + h * h + h + h * mlp + mlp + mlp * h + h + 2 * head  # qkv, proj, mlp, norms
        single = h * (3 * h + mlp) + 3 * h + mlp + (h + mlp) * h + h + 2 * head
        width, layers = self.approximator_hidden_dim, self.approximator_layers
        approximator = (self.approximator_in_dim * width + width + layers * (2 * (width * width + width) + width)
                        + width * h + h)
        other = (self.in_channels * h + h + self.context_in_dim * h + h + approximator
                 + h * self.out_channels + self.out_channels)
        return 2 * stream, single, other

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], config: Mapping | None = None) -> "ChromaParams":
        """Every size from the tensor shapes of a Chroma file (no prefix); `config` (e.g. a file's metadata) may
        supply `axes_dim` and `theta`, which shapes cannot show."""

        def shape(key: str) -> Sequence[int]:
            if key not in shapes:
                raise KeyError(f"tensor '{key}' is missing; a Chroma transformer has it")
            return shapes[key]

        hidden, in_channels = shape("img_in.weight")
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        approximator_hidden, approximator_in = shape("distilled_guidance_layer.in_proj.weight")
        out_proj = tuple(shape("distilled_guidance_layer.out_proj.weight"))
        if out_proj != (hidden, approximator_hidden):
            raise ValueError(f"distilled_guidance_layer.out_proj.weight is {list(out_proj)}, expected "
                             f"[{hidden}, {approximator_hidden}] (hidden size x approximator width)")
        config = dict(config or {})
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_hidden_dim=shape("double_blocks.0.img_mlp.0.weight")[0],
            num_heads=hidden // head_dim,
            depth=_count_blocks(shapes, "double_blocks"),
            depth_single_blocks=_count_blocks(shapes, "single_blocks"),
            axes_dim=tuple(config.get("axes_dim") or default_axes_dim(head_dim)),
            theta=int(config.get("theta", 10_000)),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            approximator_in_dim=approximator_in,
            approximator_hidden_dim=approximator_hidden,
            approximator_layers=_count_blocks(shapes, "distilled_guidance_layer.layers"),
        )


def text_key_mask(txt_attention_mask: Tensor, extra: int = ATTEND_PADDING_TOKENS) -> Tensor:
    """Which text tokens each sample attends to: its caption's tokens (the T5 mask, a prefix of ones) and `extra`
    padding tokens after them, as sd-scripts' Chroma does. [B, L] bool."""
    length = txt_attention_mask.shape[1]
    kept = (txt_attention_mask.bool().sum(dim=-1) + extra).clamp(max=length)
    return torch.arange(length, device=txt_attention_mask.device)[None] < kept[:, None]


# --------------------------------------------------------------------------------------------- layers

class Approximator(nn.Module):
    """`distilled_guidance_layer`: input projection, residual RMS-normed MLPs, output projection to hidden size."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int):
        super().__init__()
        self.in_proj = Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(layers))
        self.out_proj = Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class GivenModulation(nn.Module):
    """Stands where a FLUX block's `Modulation` was: instead of computing shift/scale/gate from a conditioning
    vector, hands out `count` of the block's precomputed vectors ([B, n, hidden]) from `start`, each [B, 1, hidden]
    as `Modulation` returns them. No parameters, so no keys in the file and no LoRA target."""

    def __init__(self, start: int, count: int):
        super().__init__()
        self.start, self.count = start, count

    def forward(self, vectors: Tensor) -> tuple[Tensor, ...]:
        return tuple(vectors[:, i: i + 1] for i in range(self.start, self.start + self.count))


class GivenFinalModulation(nn.Module):
    """Stands where `LastLayer.adaLN_modulation` was: the two given vectors [B, 2, hidden] as one [B, 2*hidden]
    (shift, then scale), the shape `LastLayer` splits."""

    def forward(self, vectors: Tensor) -> Tensor:
        return vectors.flatten(1)


class ChromaDoubleBlock(DoubleStreamBlock):
    """FLUX's double block fed the approximator's vectors [B, 12, hidden]: image stream's 6, then text stream's 6."""

    def __init__(self, p: ChromaParams):
        super().__init__(p)
        self.img_mod = GivenModulation(0, 6)
        self.txt_mod = GivenModulation(6, 6)


class ChromaSingleBlock(SingleStreamBlock):
    """FLUX's single block fed its 3 vectors [B, 3, hidden] from the approximator."""

    def __init__(self, p: ChromaParams):
        super().__init__(p)
        self.modulation = GivenModulation(0, 3)


class ChromaLastLayer(LastLayer):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__(hidden, out_channels)
        self.adaLN_modulation = GivenFinalModulation()


# ---------------------------------------------------------------------------------------------- model

class Chroma(Flux):
    """A Flux subclass so that what works on the FLUX transformer (block runners, block swap, fp8, LoRA targets
    and loading) works on it; `Flux.__init__` is not run because Chroma has none of FLUX's embedders."""

    def __init__(self, params: ChromaParams):
        nn.Module.__init__(self)
        self.params = params
        self.img_in = Linear(params.in_channels, params.hidden_size)
        self.txt_in = Linear(params.context_in_dim, params.hidden_size)
        self.distilled_guidance_layer = Approximator(params.approximator_in_dim, params.approximator_hidden_dim,
                                                     params.hidden_size, params.approximator_layers)
        self.double_blocks = nn.ModuleList(ChromaDoubleBlock(params) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(ChromaSingleBlock(params) for _ in range(params.depth_single_blocks))
        self.final_layer = ChromaLastLayer(params.hidden_size, params.out_channels)
        self.gradient_checkpointing = False
        self.block_runner: Callable[..., Any] | None = None

    def modulation_vectors(self, timesteps: Tensor, guidance: Tensor) -> Tensor:
        """[B, modulation_count, hidden]: the approximator applied to, for each vector, the embeddings of the
        timestep and guidance (a quarter of its input each) and of the vector's index (the other half)."""
        p = self.params
        count, quarter = p.modulation_count, p.approximator_in_dim // 4
        conditioning = torch.cat((timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)), -1)
        index = timestep_embedding(torch.arange(count, device=timesteps.device), 2 * quarter)
        batch = conditioning.shape[0]
        x = torch.cat((conditioning[:, None].expand(-1, count, -1), index[None].expand(batch, -1, -1)), dim=-1)
        return self.distilled_guidance_layer(x.to(self.img_in.weight.dtype))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor | None = None,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """As `Flux.forward`. `y` (FLUX's pooled CLIP-L vector) is accepted and unused: Chroma has no CLIP-L.
        guidance: default 0 (what Chroma trains with). txt_attention_mask [B, L] (T5's, a prefix of ones): each
        sample attends to its caption and one padding token after it, as sd-scripts' Chroma does."""
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        vectors = self.modulation_vectors(timesteps, guidance)
        txt = self.txt_in(txt.to(dtype))
        pe = self.position_embedding(torch.cat((txt_ids, img_ids), dim=1))
        mask = None
        if txt_attention_mask is not None:
            keep_img = torch.ones(img.shape[0], img.shape[1], dtype=torch.bool, device=img.device)
            mask = torch.cat((text_key_mask(txt_attention_mask), keep_img), dim=1)[:, None, None, :]

        p = self.params
        for i, block in enumerate(self.double_blocks):
            image, text = p.double_offsets(i)
            block_vectors = torch.cat((vectors[:, image: image + 6], vectors[:, text: text + 6]), dim=1)
            img, txt = self._run("double", i, block, img, txt, block_vectors, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            start = p.single_offset(i)
            x = self._run("single", i, block, x, vectors[:, start: start + 3], pe, mask)
        return self.final_layer(x[:, txt.shape[1]:], vectors[:, p.final_offset: p.final_offset + 2])


class NoClipL:
    """Stands where the CLIP-L encoder is for FLUX when the transformer is Chroma, which has none: each prompt's
    "pooled vector" is empty ([B, 0]); Chroma ignores it, and a cache holding one can never feed a FLUX model."""

    pooled_width = 0  # what a text-encoder cache made for Chroma stores (a FLUX model's is CLIP-L's hidden size)

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        return torch.zeros(1 if isinstance(prompts, str) else len(prompts), 0)

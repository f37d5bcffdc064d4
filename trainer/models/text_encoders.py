"""CLIP-L and T5-XXL text encoders for FLUX.1, as transformers models configured from the file's tensor shapes.

FLUX uses CLIP-L's pooled output (no projection) as the conditioning vector `y` and T5-XXL's last hidden state as
the text sequence `txt`. Tokenizers come from a local folder or a Hugging Face id and are loaded on first use, so
a model used only with cached text outputs never needs one.
"""

from __future__ import annotations

import os
import re
import types
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError

CLIP_HEAD_DIM = 64  # the one CLIP-L size not visible in any tensor shape
CLIP_MAX_LENGTH = 77
DEFAULT_TOKENIZERS = {"clip_l": "openai/clip-vit-large-patch14", "t5xxl": "google/t5-v1_1-xxl"}
TOKENIZER_DIR_ENV = "FLUX_TRAINER_TOKENIZERS"  # a folder holding clip_l/ and t5xxl/


def _count(shapes: Mapping[str, Sequence[int]], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := regex.match(k))})


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> Sequence[int]:
    if key not in shapes:
        raise KeyError(f"tensor '{key}' is missing")
    return shapes[key]


def clip_config_from_shapes(shapes: Mapping[str, Sequence[int]]):
    from transformers import CLIPTextConfig

    vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight")
    if hidden % CLIP_HEAD_DIM and hidden > CLIP_HEAD_DIM:
        raise ValueError(f"hidden size {hidden} is not a multiple of CLIP's head size {CLIP_HEAD_DIM}")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(shapes, "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        max_position_embeddings=_shape(shapes, "embeddings.position_embedding.weight")[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def build_clip_text_model(shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_config_from_shapes(shapes))


def t5_config_from_shapes(shapes: Mapping[str, Sequence[int]]):
    from transformers import T5Config

    vocab, d_model = _shape(shapes, "shared.weight")
    buckets, heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "wi_0" if gated else "wi"
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=_shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=_shape(shapes, f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def build_t5_encoder(shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    from transformers import T5EncoderModel

    return T5EncoderModel(t5_config_from_shapes(shapes))


def t5_encoder_on_meta(path: str | os.PathLike) -> nn.Module:
    """The T5-XXL encoder of the file at `path` built on the meta device from its header alone (no tensor is read):
    its Linear layers' names and shapes, for planning a LoRA on T5 before any model is loaded."""
    from .loading import MODEL_SLOTS, _open

    expected, kinds, hint = MODEL_SLOTS["t5xxl"]
    file, component = _open(path, expected, kinds, hint)
    with file:
        local = {key[len(component.prefix):]: shape for key, shape in file.shapes.items()
                 if key.startswith(component.prefix)}
        local.setdefault("shared.weight", local.get("encoder.embed_tokens.weight"))  # one tied tensor, two names
        with torch.device("meta"):
            try:
                return build_t5_encoder(local)
            except (KeyError, ValueError, TypeError) as e:
                raise file.error(f"holds {component.describe()} that cannot be built: {e}") from e


def feed_forward_keeps_input_dtype(ff: nn.Module) -> None:
    """Make a T5 feed-forward (gated or not) call `wo` on its activations as they are. transformers casts them to
    `wo`'s weight dtype first (so that `wo` can stay in float32 in a float16 model); with `wo` stored in fp8 that
    would quantise the activations, while our fp8 Linear upcasts its weight to the input's dtype instead."""
    ff.forward = types.MethodType(_feed_forward, ff)


def _feed_forward(ff: nn.Module, hidden: Tensor) -> Tensor:
    if hasattr(ff, "wi_0"):  # T5 v1.1 (T5-XXL): gated
        hidden = ff.act(ff.wi_0(hidden)) * ff.wi_1(hidden)
    else:
        hidden = ff.act(ff.wi(hidden))
    return ff.wo(ff.dropout(hidden))


def load_tokenizer(kind: str, spec: str | os.PathLike | None):
    """`spec`: a folder, a Hugging Face id, or None for $FLUX_TRAINER_TOKENIZERS/<kind> or the default id."""
    from transformers import AutoTokenizer

    if spec is None:
        env = os.environ.get(TOKENIZER_DIR_ENV)
        spec = Path(env) / kind if env and (Path(env) / kind).is_dir() else DEFAULT_TOKENIZERS[kind]
    needed = {"clip_l": ("vocab.json", "merges.txt"), "t5xxl": ("tokenizer.json",)}[kind]
    expected = f"a folder with {' and '.join(needed)}, or a Hugging Face id"
    local = Path(spec).is_dir()
    if local and not all((Path(spec) / name).is_file() for name in needed):
        raise ConfigError(f"{kind} tokenizer folder '{spec}' lacks {' or '.join(needed)}; expected {expected}")
    try:
        return AutoTokenizer.from_pretrained(str(spec), local_files_only=local)
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is wrong
        reason = " ".join(str(e).split())
        raise ConfigError(f"{kind} tokenizer '{spec}' cannot be loaded ({reason}); expected {expected}") from e


class _WithTokenizer(nn.Module):
    kind = ""

    def __init__(self, model: nn.Module, tokenizer: str | os.PathLike | None):
        super().__init__()
        self.model = model
        self.tokenizer_spec = tokenizer
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.kind, self.tokenizer_spec)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(self, prompts: str | Sequence[str], max_length: int):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")


class ClipL(_WithTokenizer):
    """CLIP-L: prompts -> pooled output [B, hidden] (768 for the real model)."""

    kind = "clip_l"

    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        return self._tokens(prompts, CLIP_MAX_LENGTH).input_ids

    @property
    def eos_token_id(self) -> int:
        if self._tokenizer is not None and self._tokenizer.eos_token_id is not None:
            return self._tokenizer.eos_token_id
        return self.model.config.eos_token_id

    def forward(self, input_ids: Tensor) -> Tensor:
        """Pooled output: the final hidden state at each prompt's first end-of-text token."""
        input_ids = input_ids.to(self.device)
        hidden = self.model(input_ids=input_ids).last_hidden_state
        is_eos = input_ids == self.eos_token_id
        position = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), input_ids.argmax(-1))
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), position]

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        return self(self.tokenize(prompts))


class T5XXL(_WithTokenizer):
    """T5-XXL encoder: prompts -> last hidden state [B, max_length, d_model] (4096 for the real model) and mask."""

    kind = "t5xxl"

    def __init__(self, model: nn.Module, tokenizer: str | os.PathLike | None, max_length: int = 512):
        super().__init__(model, tokenizer)
        self.max_length = max_length

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        out = self._tokens(prompts, max_length or self.max_length)
        return out.input_ids, out.attention_mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.model(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state

    def encode(self, prompts: str | Sequence[str], apply_attention_mask: bool = False) -> tuple[Tensor, Tensor]:
        """Hidden states and the token mask (1 = real token). The mask enters T5 itself only when asked, as
        sd-scripts' --apply_t5_attn_mask does."""
        ids, mask = self.tokenize(prompts)
        return self(ids, mask if apply_attention_mask else None), mask

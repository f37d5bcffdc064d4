"""The toy FLUX family's sizes and files: the pretrained transformer and autoencoder (weights/, which
`python -m trainer.toy.pretrain` writes), and the random-weight tiny text encoders with generated character-level
tokenizers they are pretrained with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ModelFileError
from ..models.autoencoder import AutoEncoderParams
from ..models.flux import FluxParams, default_axes_dim
from ..models.tiny import TINY_CLIP, TINY_T5, write_clip_l, write_t5xxl
from ..models.tiny_tokenizers import write_tokenizers

WEIGHTS = Path(__file__).resolve().parent / "weights"
TOY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)  # 32x32 pixels -> 16x8x8 latents
TOY_FLUX = FluxParams(in_channels=64, out_channels=64, vec_in_dim=TINY_CLIP["hidden_size"],
                      context_in_dim=TINY_T5["d_model"], hidden_size=128, mlp_hidden_dim=512, num_heads=2, depth=2,
                      depth_single_blocks=2, axes_dim=default_axes_dim(64))  # what loaders infer from the head size
CLIP_SEED, T5_SEED = 2, 3  # the text encoders are regenerated from these seeds (random weights, never trained)
# Character-level tokens: the longest caption, "a yellow triangle on a white background", is 34 with </s>; T5 must see
# every word (colour, shape and background), so the whole caption fits, with room for a longer concept word.
T5_MAX_LENGTH = 40


def write_text_encoders(folder: str | os.PathLike) -> dict[str, Path]:
    """clip_l.safetensors, t5xxl_fp16.safetensors and tokenizers/{clip_l,t5xxl} in `folder`: exactly what the toy
    transformer was pretrained with."""
    folder = Path(folder)
    tokenizers = write_tokenizers(folder / "tokenizers")
    return {"clip_l": write_clip_l(folder / "clip_l.safetensors", seed=CLIP_SEED),
            "t5xxl": write_t5xxl(folder / "t5xxl_fp16.safetensors", seed=T5_SEED),
            "clip_l_tokenizer": tokenizers["clip_l"], "t5xxl_tokenizer": tokenizers["t5xxl"]}


def write_toy_model_set(folder: str | os.PathLike, weights: str | os.PathLike = WEIGHTS) -> dict[str, Path]:
    """flux.safetensors and ae.safetensors (copies of the pretrained toy weights), the text encoders and their
    tokenizers, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("flux", "ae"):
        source = Path(weights) / f"{name}.safetensors"
        if not source.is_file():
            raise ModelFileError(f"{source}: no such file; expected the pretrained toy {name} weights, which "
                                 "`python -m trainer.toy.pretrain` makes")
        files[name] = Path(shutil.copyfile(source, folder / source.name))
    return {**files, **write_text_encoders(folder)}

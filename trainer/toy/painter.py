"""The toy family loaded through the trainer's normal loaders, drawing captions with the trainer's own sampler."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models.loading import load_autoencoder, load_clip_l, load_flux, load_t5xxl
from ..sampling import SamplePrompt, generate
from . import shapes
from .models import T5_MAX_LENGTH, WEIGHTS, write_text_encoders


class ToyPainter:
    """`draw(caption, seed)` -> a PIL picture; `flux` is the transformer, for applying a LoRA to it."""

    def __init__(self, scratch: str | os.PathLike, weights: str | os.PathLike = WEIGHTS, steps: int = 16):
        files = write_text_encoders(scratch)
        self.clip = load_clip_l(files["clip_l"], dtype=torch.float32, tokenizer=files["clip_l_tokenizer"])
        self.t5 = load_t5xxl(files["t5xxl"], dtype=torch.float32, tokenizer=files["t5xxl_tokenizer"],
                             max_length=T5_MAX_LENGTH)
        self.flux = load_flux(Path(weights) / "flux.safetensors", dtype=torch.float32)
        self.ae = load_autoencoder(Path(weights) / "ae.safetensors", dtype=torch.float32)
        self.steps = steps

    @torch.no_grad()
    def draw(self, caption: str, seed: int, size: int = shapes.SIZE):
        cond = (self.clip.encode([caption]), self.t5(self.t5.tokenize([caption])[0]), None)
        prompt = SamplePrompt(caption, width=size, height=size, steps=self.steps, guidance=1.0, seed=seed)
        return generate(self.flux, self.ae, cond, prompt)

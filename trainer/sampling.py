"""Preview images during training: sd-scripts' prompt files and flags, an Euler flow-matching sampler with FLUX's
time shift and guidance embedding, PNGs named as sd-scripts names them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import PromptFileError
from .flow import image_ids, pack_latents, sampling_schedule, text_ids, unpack_latents


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 3.5  # FLUX's guidance embedding (--g)
    scale: float = 1.0  # classifier-free guidance with the negative prompt (--l); 1 = off
    seed: int | None = None
    index: int = 0


_FLAGS = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int), "g": ("guidance", float),
          "l": ("scale", float), "n": ("negative_prompt", str)}


def parse_prompt_line(line: str, index: int = 0) -> SamplePrompt:
    """`a cat --w 768 --h 512 --d 42 --s 20 --g 3.5 --l 1.0 --n blurry`"""
    parts = re.split(r"\s--(?=[a-z]\s)", " " + line.strip())
    values: dict = {"prompt": parts[0].strip(), "index": index}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        if flag not in _FLAGS:
            raise PromptFileError(f"prompt {index + 1}: unknown option --{flag}; expected one of "
                                  f"{', '.join('--' + f for f in _FLAGS)}")
        name, kind = _FLAGS[flag]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise PromptFileError(f"prompt {index + 1}: --{flag} {value.strip()!r} is not a {kind.__name__}") from None
    return SamplePrompt(**values)


def read_prompts(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is not part of the text
    except OSError as e:
        raise PromptFileError(f"{path}: cannot be read ({e.strerror or e})") from e
    if path.suffix.lower() == ".txt":
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        try:
            return [parse_prompt_line(line, i) for i, line in enumerate(lines)]
        except PromptFileError as e:
            raise PromptFileError(f"{path}: {e}") from None
    if path.suffix.lower() == ".toml":
        from .tomlio import TOMLError, loads

        try:
            entries = loads(text).get("prompt", [])
        except TOMLError as e:
            raise PromptFileError(f"{path}: not valid TOML ({e})") from e
    elif path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except ValueError as e:
            raise PromptFileError(f"{path}: not valid JSON ({e})") from e
    else:
        raise PromptFileError(f"{path}: expected a .txt, .toml or .json prompt file")
    names = {"width": "width", "height": "height", "seed": "seed", "sample_steps": "steps", "steps": "steps",
             "guidance_scale": "guidance", "scale": "scale", "negative_prompt": "negative_prompt", "prompt": "prompt"}
    prompts = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - set(names)
        if unknown or "prompt" not in entry:
            raise PromptFileError(f"{path}: prompt {i + 1} needs 'prompt'; unknown keys {sorted(unknown)}")
        prompts.append(SamplePrompt(index=i, **{names[k]: v for k, v in entry.items()}))
    return prompts


def sample_filename(output_name: str | None, index: int, seed: int | None, epoch: int | None = None,
                    step: int | None = None, now: datetime | None = None) -> str:
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    prefix = "" if output_name is None else output_name + "_"
    return f"{prefix}{number}_{index:02d}_{stamp}{'' if seed is None else f'_{seed}'}.png"


@torch.no_grad()
def generate(flux, ae, cond: tuple, prompt: SamplePrompt, negative: tuple | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Image.Image:
    """cond / negative: (pooled [1, D], t5 [1, L, C], t5 mask [1, L] or None) of the prompt / negative prompt."""
    width, height = max(16, prompt.width // 16 * 16), max(16, prompt.height // 16 * 16)
    h, w = height // 8, width // 8
    generator = torch.Generator().manual_seed(prompt.seed if prompt.seed is not None else 0)
    x = pack_latents(torch.randn(1, 16, h, w, generator=generator)).to(device, dtype)
    ids = image_ids(1, h, w, device=device)
    guidance = torch.full((1,), prompt.guidance, device=device)
    schedule = sampling_schedule(prompt.steps, (h // 2) * (w // 2), shift=flux.params.guidance_embed)

    def velocity(c: tuple, t: float):
        pooled, txt, mask = (v.to(device) if v is not None else None for v in c)
        return flux(x, ids, txt.to(dtype), text_ids(1, txt.shape[1], device=device), torch.full((1,), t, device=device),
                    pooled.to(dtype), guidance, mask).float()

    for t, t_next in zip(schedule[:-1], schedule[1:]):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            v = velocity(cond, t)
            if negative is not None and prompt.scale != 1.0:
                v = velocity(negative, t) + prompt.scale * (v - velocity(negative, t))
        x = (x.float() + (t_next - t) * v).to(dtype)
    pixels = ae.decode(unpack_latents(x.float(), h, w).to(next(ae.parameters()).device)).float().clamp(-1, 1)
    array = ((pixels[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)


def with_seed(prompt: SamplePrompt, seed: int) -> SamplePrompt:
    return prompt if prompt.seed is not None else replace(prompt, seed=seed)


__all__ = ["SamplePrompt", "PromptFileError", "parse_prompt_line", "read_prompts", "sample_filename", "generate",
           "with_seed"]

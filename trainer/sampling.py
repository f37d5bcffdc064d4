"""Preview images during training: sd-scripts' prompt files and flags, an Euler flow-matching sampler with FLUX's
time shift and guidance embedding, PNGs named as sd-scripts names them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config.model_type import CHROMA_SAMPLE_GUIDANCE
from .errors import PromptFileError
from .flow import image_ids, pack_latents, sampling_schedule, text_ids, unpack_latents


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 3.5  # FLUX's guidance embedding (--g, guidance_scale)
    scale: float = 1.0  # classifier-free guidance with the negative prompt (--l, scale); 1 = off
    seed: int | None = None
    index: int = 0
    # what was ignored or altered, one entry per flag or key, and where the prompt came from ("p.txt line 4")
    notes: tuple[str, ...] = field(default=(), compare=False)
    where: str = field(default="", compare=False)
    # False when a prompt file set no guidance (no --g): the model's default applies (see preview_guidance)
    guidance_given: bool = field(default=True, compare=False)

    def __post_init__(self):
        _check_bounds(self)  # also for prompts built in code, not read from a file

    @property
    def warning(self) -> str | None:
        """One message for the prompt naming every flag or key that is ignored or altered, and why; None if none."""
        if not self.notes:
            return None
        where = f" ({self.where})" if self.where else ""
        return f"sample prompt {self.index + 1}{where}: " + "; ".join(self.notes)


# sd-scripts' prompt-line flags (library/train_util.py, line_to_prompt_dict) in the order it tries them: each pattern
# is matched case-insensitively at the start of the text after a " --", so "--W 512" is --w and "--w 512px" reads 512.
_WHOLE, _DECIMAL, _TEXT = r"(\d+)", r"([\d.]+)", r"(.+)"
_EXPECTS = {_WHOLE: "a whole number >= 0", _DECIMAL: "a number >= 0", _TEXT: "a value"}
_LINE_FLAGS = (("w", _WHOLE, "width"), ("h", _WHOLE, "height"), ("d", _WHOLE, "seed"), ("s", _WHOLE, "sample_steps"),
               ("l", _DECIMAL, "scale"), ("g", _DECIMAL, "guidance_scale"), ("n", _TEXT, "negative_prompt"),
               ("ss", _TEXT, "sample_sampler"), ("cn", _TEXT, "controlnet_image"), ("ctr", _TEXT, "cfg_trunc_ratio"),
               ("rcfg", _TEXT, "renorm_cfg"), ("fs", _TEXT, "flow_shift"))
_LINE_PATTERNS = tuple((flag, re.compile(f"{flag} {value}", re.IGNORECASE), value, key)
                       for flag, value, key in _LINE_FLAGS)
_FLAG_LIST = ", ".join("--" + flag for flag, _, _ in _LINE_FLAGS)

# the keys FLUX previews act on: sd-scripts' prompt-dict key -> (our field, type)
_ACTED = {"prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "width": ("width", int),
          "height": ("height", int), "sample_steps": ("steps", int), "guidance_scale": ("guidance", float),
          "scale": ("scale", float), "seed": ("seed", int)}
# keys sd-scripts' prompt files carry that its FLUX sampling (flux_train_utils.sample_image_inference) does not use
_IGNORED = {
    "sample_sampler": "FLUX previews always use the Euler flow-matching sampler (sd-scripts' FLUX sampling ignores "
                      "it too)",
    "controlnet_image": "a ControlNet conditioning image; LoRA training has no ControlNet",
    "cfg_trunc_ratio": "CFG truncation is a Lumina 2 sampling option",
    "renorm_cfg": "CFG renormalisation is a Lumina 2 sampling option",
    "flow_shift": "FLUX previews shift the schedule by the image size (a per-prompt flow shift is a HunyuanImage/Anima "
                  "option)",
}
_INTERNAL = ("enum", "subset")  # sd-scripts sets or drops these itself

# ours: what a preview may ask for, so a prompt line from a shared workflow cannot allocate until the process dies.
# FLUX.1 renders up to about 2 MP well; 4096 px a side and 4 MP (e.g. 2048x2048, 4096x1024) leave room above that.
MAX_PREVIEW_SIDE = 4096
MAX_PREVIEW_PIXELS = 4 * 1024 * 1024
MAX_SAMPLE_STEPS = 1000  # sd-scripts holds steps to 1-1000
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generators take
_FLAG_OF = {"width": "--w", "height": "--h", "seed": "--d", "steps": "--s", "guidance": "--g", "scale": "--l"}


def _note(flag: str, value: str, why: str) -> str:
    return f"--{flag} {value}: {why}" if value else f"--{flag}: {why}"


def _parse_flags(parts: list[str]) -> tuple[dict, list[str]]:
    """The pieces after each " --" as sd-scripts reads them (the first pattern that matches wins) into prompt-dict
    keys. sd-scripts drops silently what no pattern matches; here each drop is noted, as is each ignored flag."""
    values: dict = {}
    notes: list[str] = []
    unknown: list[str] = []
    for part in parts:
        for flag, pattern, kind, key in _LINE_PATTERNS:
            match = pattern.match(part)
            if match:
                break
        else:
            word, _, value = part.partition(" ")
            kind = next((k for f, k, _ in _LINE_FLAGS if f == word.lower()), None)
            if kind:
                notes.append(_note(word, value.strip(), f"expects {_EXPECTS[kind]} after one space; ignored"))
            else:
                unknown.append(f"--{word} {value.strip()}".rstrip())
            continue
        text, rest = match.group(1), part[match.end():].strip()
        flag = part[:len(flag)]  # as written (upper or lower case), for the notes
        if key in _IGNORED:
            notes.append(_note(flag, text, _IGNORED[key] + "; ignored"))
            continue
        if kind == _DECIMAL:
            try:
                values[key] = float(text)
            except ValueError:
                notes.append(_note(flag, text, "not a number; ignored"))
                continue
        elif kind == _WHOLE:
            values[key] = int(text)
            if key == "sample_steps" and not 1 <= values[key] <= 1000:
                values[key] = max(1, min(1000, values[key]))
                notes.append(_note(flag, text, f"steps are held to 1-1000 as in sd-scripts; {values[key]} used"))
        else:
            values[key] = text
        if rest:
            notes.append(_note(flag, part[len(flag):].strip(), f"read as {text}; the rest ({rest!r}) is ignored"))
    if unknown:
        notes.append(f"{', '.join(unknown)}: not {'a flag' if len(unknown) == 1 else 'flags'} of sd-scripts' sample "
                     f"prompts ({_FLAG_LIST}); ignored, and the text is not part of the prompt")
    return values, notes


def _prompt_from(values: dict, notes: list[str], index: int, where: str) -> SamplePrompt:
    """A SamplePrompt from sd-scripts' prompt-dict keys (type-checked), noting what FLUX previews ignore."""
    fields = {_ACTED[k][0]: v for k, v in values.items() if k in _ACTED and v is not None}
    notes = notes + [f"{key}: {_IGNORED[key]}; ignored" for key in values if key in _IGNORED]
    prompt = SamplePrompt(**{"prompt": "", **fields}, index=index, where=where, guidance_given="guidance" in fields)
    if prompt.negative_prompt and prompt.scale == 1.0:
        notes.append("the negative prompt is ignored: the CFG scale (--l, scale) is 1.0, so no negative pass runs "
                     "(as in sd-scripts)")
    return replace(prompt, notes=tuple(notes))


def _check_bounds(prompt: SamplePrompt) -> None:
    """Sizes, seeds and numbers a preview cannot use are refused (PromptFileError naming the prompt, the flag and
    the limit) before any model loads."""
    def refuse(field_name: str, why: str):
        where = f" ({prompt.where})" if prompt.where else ""
        raise PromptFileError(f"sample prompt {prompt.index + 1}{where}: {_FLAG_OF[field_name]} ({field_name}) "
                              f"{getattr(prompt, field_name)}: {why}")

    for name in ("width", "height"):
        if getattr(prompt, name) > MAX_PREVIEW_SIDE:
            refuse(name, f"previews are at most {MAX_PREVIEW_SIDE} px a side")
    if prompt.width * prompt.height > MAX_PREVIEW_PIXELS:
        refuse("width", f"{prompt.width}x{prompt.height} is more than the {MAX_PREVIEW_PIXELS / 2**20:g} MP a preview "
                        f"may have (e.g. 2048x2048 or 4096x1024)")
    if prompt.steps > MAX_SAMPLE_STEPS:
        refuse("steps", f"at most {MAX_SAMPLE_STEPS} steps (sd-scripts' limit)")
    if prompt.seed is not None and not SEED_RANGE[0] <= prompt.seed <= SEED_RANGE[1]:
        refuse("seed", f"expected a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]} (a 64-bit seed)")
    for name in ("guidance", "scale"):
        if not math.isfinite(getattr(prompt, name)):
            refuse(name, "expected a finite number")


def parse_prompt_line(line: str, index: int = 0, where: str = "") -> SamplePrompt:
    """A prompt line as sd-scripts reads it: `a cat --w 768 --h 512 --d 42 --s 20 --g 3.5 --l 1.0 --n blurry`.

    The line splits at every " --"; the first piece is the prompt, each other piece a flag (case-insensitive). What
    sd-scripts would drop silently (unknown flags, bad values, options FLUX previews do not use) is noted on the
    prompt (`SamplePrompt.warning`) instead of stopping the run."""
    values, notes = _split_line(line)
    return _prompt_from(values, notes, index, where)


def _split_line(line: str) -> tuple[dict, list[str]]:
    parts = line.strip().split(" --")
    values, notes = _parse_flags(parts[1:])
    if parts[0].startswith("--"):
        notes.insert(0, "the line starts with '--': flags are read only after ' --' (a space first), so this text "
                        "stays in the prompt, as in sd-scripts")
    return {"prompt": parts[0], **values}, notes


def _checked_entry(entry, where: str) -> tuple[dict, list[str]]:
    """A prompt-dict from a .json/.toml file: the keys FLUX previews use, type-checked; unknown keys noted."""
    if isinstance(entry, str):
        return _split_line(entry)
    if not isinstance(entry, dict):
        raise PromptFileError(f"{where}: expected a prompt line (a string) or a table of prompt keys, not "
                              f"{type(entry).__name__}")
    values, notes = {}, []
    for key, value in entry.items():
        if key in _ACTED:
            kind = _ACTED[key][1]
            ok = (value is None or (isinstance(value, kind) and not isinstance(value, bool))
                  or (kind is float and isinstance(value, int) and not isinstance(value, bool)))
            if not ok:
                expected = {int: "a whole number", float: "a number", str: "text"}[kind]
                raise PromptFileError(f"{where}: {key} {value!r} is not {expected}")
            if key == "sample_steps" and value is not None and value < 1:
                raise PromptFileError(f"{where}: sample_steps {value} must be at least 1")
            values[key] = float(value) if kind is float and value is not None else value
        elif key in _IGNORED:
            values[key] = value
        elif key not in _INTERNAL:
            hint = " (did you mean sample_steps?)" if key == "steps" else ""
            notes.append(f"{key}: not a prompt key sd-scripts knows{hint}; ignored")
    if values.get("prompt") is None:
        notes.append("no 'prompt': the empty prompt is used, as in sd-scripts")
    return values, notes


def _entries(path: Path, text: str) -> list:
    """The prompt entries of a .toml or .json prompt file, as sd-scripts' load_prompts lists them."""
    if path.suffix.lower() == ".toml":
        from .tomlio import TOMLError, loads

        try:
            data = loads(text)
        except TOMLError as e:
            raise PromptFileError(f"{path}: not valid TOML ({e})") from e
        table = data.get("prompt")
        if isinstance(table, list):  # ours before sd-scripts' layout: [[prompt]] tables, one per prompt
            return table
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise PromptFileError(f"{path}: expected a [prompt] table (keys shared by every prompt) with "
                                  "[[prompt.subset]] tables, one per prompt, as sd-scripts reads it")
        # a key in both: the subset's wins (sd-scripts' dict(**shared, **subset) raises a TypeError instead)
        shared = {k: v for k, v in table.items() if k != "subset"}
        return [{**shared, **subset} if isinstance(subset, dict) else subset for subset in table["subset"]]
    from .tomlio import loads_json

    try:
        entries = loads_json(text)
    except ValueError as e:
        raise PromptFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompts (strings or objects), not "
                              f"{type(entries).__name__}")
    return entries


def read_prompts(path: str | Path, warn=None) -> list[SamplePrompt]:
    """The prompts of a .txt (one prompt line each; lines starting with # are comments), .toml ([prompt] with
    [[prompt.subset]]) or .json (a list of prompt lines or objects) file, as sd-scripts' load_prompts reads them.
    `warn(text)`, when given, receives each prompt's one warning (flags or keys ignored, values altered)."""
    from .tomlio import NotText, read_text

    path = Path(path)
    try:
        text = read_text(path)  # UTF-8, or UTF-16/32 with a byte-order mark (Windows editors' "Unicode")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot be read ({e.strerror or e})") from e
    except NotText as e:
        raise PromptFileError(f"{path}: {e}") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = prompt_lines(text.splitlines(), path.name)
    elif suffix in (".toml", ".json"):
        prompts = []
        for i, entry in enumerate(_entries(path, text)):
            where = f"{path.name} prompt {i + 1}"
            values, notes = _checked_entry(entry, f"{path}: prompt {i + 1}")
            prompts.append(_prompt_from(values, notes, i, where))
    else:
        raise PromptFileError(f"{path}: expected a .txt, .toml or .json prompt file")
    _warn_each(prompts, warn)
    return prompts


def prompt_lines(lines, source: str) -> list[SamplePrompt]:
    """Prompt lines as a .txt prompt file holds them (sd-scripts: a line is a comment only when its first character
    is "#"; blank lines are skipped); `source` names them in messages."""
    numbered = [(n, ln.strip()) for n, ln in enumerate(lines, 1) if ln.strip() and ln[0] != "#"]
    return [parse_prompt_line(line, i, f"{source} line {number}") for i, (number, line) in enumerate(numbered)]


def preview_prompts(previews, warn=None) -> list[SamplePrompt]:
    """The prompts a PreviewConfig gives: its prompt file, or its prompt lines (the train node's box), or none."""
    if previews.sample_prompts:
        return read_prompts(previews.sample_prompts, warn=warn)
    prompts = prompt_lines(previews.sample_prompt_lines, "sample_prompts")
    _warn_each(prompts, warn)
    return prompts


def _warn_each(prompts: list[SamplePrompt], warn) -> None:
    if warn is not None:
        for prompt in prompts:
            if prompt.warning:
                warn(prompt.warning)


def sample_filename(output_name: str | None, index: int, seed: int | None, epoch: int | None = None,
                    step: int | None = None, now: datetime | None = None) -> str:
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    prefix = "" if output_name is None else output_name + "_"
    return f"{prefix}{number}_{index:02d}_{stamp}{'' if seed is None else f'_{seed}'}.png"


def preview_guidance(prompt: SamplePrompt, params) -> float:
    """The guidance value a preview feeds the model: the prompt's --g; without one, 3.5 for FLUX (sd-scripts'
    default) and 0.0 for Chroma, whose guidance input was distilled at 0 (sd-scripts' guide has Chroma previews
    use --g 0)."""
    if not prompt.guidance_given and params.variant == "chroma":
        return CHROMA_SAMPLE_GUIDANCE
    return prompt.guidance


@torch.no_grad()
def generate(flux, ae, cond: tuple, prompt: SamplePrompt, negative: tuple | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Image.Image:
    """cond / negative: (pooled [1, D], t5 [1, L, C], t5 mask [1, L] or None) of the prompt / negative prompt."""
    down = ae.params.downscale
    step = 2 * down  # latents are packed 2x2
    width, height = max(step, prompt.width // step * step), max(step, prompt.height // step * step)
    h, w = height // down, width // down
    generator = torch.Generator().manual_seed(prompt.seed if prompt.seed is not None else 0)
    x = pack_latents(torch.randn(1, ae.params.z_channels, h, w, generator=generator)).to(device, dtype)
    ids = image_ids(1, h, w, device=device)
    guidance = torch.full((1,), preview_guidance(prompt, flux.params), device=device)
    schedule = sampling_schedule(prompt.steps, (h // 2) * (w // 2), shift=flux.params.guidance_embed)

    def velocity(c: tuple, t: float):
        pooled, txt, mask = (v.to(device) if v is not None else None for v in c)
        return flux(x, ids, txt.to(dtype), text_ids(1, txt.shape[1], device=device), torch.full((1,), t, device=device),
                    pooled.to(dtype), guidance, mask).float()

    for t, t_next in zip(schedule[:-1], schedule[1:]):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            v = velocity(cond, t)
            if negative is not None and prompt.scale != 1.0:
                v_negative = velocity(negative, t)
                v = v_negative + prompt.scale * (v - v_negative)
        x = (x.float() + (t_next - t) * v).to(dtype)
    pixels = ae.decode(unpack_latents(x.float(), h, w).to(next(ae.parameters()).device)).float().clamp(-1, 1)
    array = ((pixels[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)


def with_seed(prompt: SamplePrompt, seed: int) -> SamplePrompt:
    return prompt if prompt.seed is not None else replace(prompt, seed=seed)


__all__ = ["SamplePrompt", "PromptFileError", "parse_prompt_line", "read_prompts", "sample_filename", "generate",
           "with_seed", "preview_guidance"]

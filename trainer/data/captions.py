"""Captions: reading them, and the per-step processing sd-scripts applies (prefix/suffix, dropout, wildcards,
shuffling with kept tokens, tag dropout, token warm-up). Randomness comes from the `random.Random` passed in, so
a run is reproducible and resumable.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from ..config.data import SubsetConfig
from ..errors import CaptionError


def read_caption(image: Path, extension: str, wildcards: bool = False) -> str | None:
    """First line of `<stem><extension>` (all non-empty lines, newline-joined, with wildcards); None if absent."""
    from ..tomlio import NotText, read_text

    if "/" in extension or "\\" in extension or extension in (".", ".."):
        raise CaptionError(f"caption_extension {extension!r}: expected the ending of a caption file's name (.txt, "
                           ".caption), not a path")
    path = image.with_name(image.stem + extension)
    if not path.is_file():
        return None
    try:
        lines = read_text(path).splitlines()  # UTF-8 (a BOM dropped), or UTF-16/32 with their BOM
    except NotText as e:
        raise CaptionError(f"caption {path}: {e}") from None
    except OSError as e:
        raise CaptionError(f"caption {path}: cannot be read ({e.strerror or e})") from None
    lines = [line.strip() for line in lines]
    if wildcards:
        return "\n".join(line for line in lines if line)
    return lines[0] if lines else ""


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\u2985", "\u2986"  # stand-ins for escaped {{ and }}
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(caption: str, subset: SubsetConfig, rng: random.Random, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption as trained in `epoch` (counted from 1, as sd-scripts' current_epoch: caption_dropout_every_n_epochs
    = N empties it in epochs N, 2N, ...) at optimizer step `step`."""
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    dropped = dropped or (subset.caption_dropout_every_n_epochs > 0
                          and epoch % subset.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""
    caption = _wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]

    warmup = subset.token_warmup_step
    if 0 < warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    marker = subset.keep_tokens_separator
    has_marker = bool(marker) and marker in caption
    # sd-scripts leaves the marker in the text when nothing is shuffled or dropped; we always split on it
    if subset.shuffle_caption or warmup > 0 or subset.caption_tag_dropout_rate > 0 or has_marker:
        sep = subset.caption_separator
        fixed, flex, fixed_suffix = [], [], []
        if has_marker:
            fixed_part, flex_part = caption.split(marker, 1)
            if marker in flex_part:
                flex_part, suffix_part = flex_part.split(marker, 1)
                fixed_suffix = _split(suffix_part, sep)
            fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if subset.keep_tokens > 0:
                fixed, flex = flex[: subset.keep_tokens], tokens[subset.keep_tokens:]
        if warmup and step < warmup:
            keep = math.floor(step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min
            flex = flex[:keep]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def caption_is_random(subset: SubsetConfig) -> bool:
    """Whether captions change from step to step (then text-encoder outputs cannot be cached)."""
    return bool(subset.options_changing_captions())

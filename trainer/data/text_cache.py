"""Text-encoder output cache: encodes each caption once with CLIP-L and T5, into memory or into the disk files
described in cache_files (sd-scripts' format), reusing valid files and re-encoding when the caption changed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import remove_stale_temporaries
from .cache_files import TEXT_KEYS as KEYS
from .cache_files import caption_sha256, read_text_entry, text_npz_path
from .dataset import DatasetError, DatasetGroup, FluxDataset, ImageItem
from .npz import read_npz, write_npz

Progress = Callable[[str, int, int], None]


def is_cached(path: Path, caption: str, apply_mask: bool, length: int, pooled_width: int | None = None) -> bool:
    """pooled_width: the pooled vector's width the run needs (0 for Chroma, CLIP-L's for FLUX), so a cache made for
    one model family never feeds the other; None: not checked."""
    data = read_npz(path)
    if data is None or not all(k in data for k in KEYS):
        return False
    if bool(data["apply_t5_attn_mask"]) != apply_mask or data["t5_out"].shape[0] != length:
        return False
    if pooled_width is not None and data["l_pooled"].shape[-1] != pooled_width:
        return False
    return "caption_sha256" not in data or str(data["caption_sha256"]) == caption_sha256(caption)


def check_text_caching(group: DatasetGroup, train_t5xxl: bool = False) -> None:
    if train_t5xxl:
        raise DatasetError("train_t5xxl trains T5 itself, so its outputs cannot be cached; turn off "
                           "--cache_text_encoder_outputs")
    for dataset in group.datasets:
        for i, subset in enumerate(dataset.config.subsets):
            options = subset.options_changing_captions()
            if options:
                raise DatasetError(f"{dataset.name} subset {i + 1} ({subset.image_dir}): {', '.join(options)} change "
                                   "the caption every step, so text-encoder outputs cannot be cached; turn off "
                                   "--cache_text_encoder_outputs or those options")


def pooled_width(clip_l) -> int:
    """The width of the pooled vectors `clip_l` gives: 0 from Chroma's stand-in (NoClipL), CLIP-L's hidden size."""
    width = getattr(clip_l, "pooled_width", None)
    return int(width) if width is not None else int(clip_l.model.config.hidden_size)


def fixed_caption(dataset: FluxDataset, item: ImageItem) -> str:
    """The caption as trained when nothing random applies (prefix, suffix, separators)."""
    return dataset.caption_for(item, random.Random(0))


def cache_text_outputs(group: DatasetGroup, clip_l, t5, to_disk: bool, batch_size: int = 1,
                       apply_t5_attn_mask: bool = False, progress: Progress | None = None,
                       cache_dir: str | Path | None = None) -> dict[str, int]:
    """Encode every caption (as trained, see fixed_caption) once; reuse valid disk caches. Disk caches are written
    batch by batch, each file atomically, so an interrupted run continues where it stopped.

    `progress(phase, done, total)` is called with done=0 before the first batch and after each batch; an exception
    it raises stops caching there: every file written so far is complete, and each item holds a valid entry (its
    outputs in memory, or text_npz naming a file with its entry) or none (text_npz is None)."""
    check_text_caching(group)
    length = t5.max_length
    todo: list[tuple[ImageItem, str]] = []
    reused = 0
    for dataset in group.datasets:
        for item in dataset.items:
            if item.repeats == 0:
                continue
            caption = fixed_caption(dataset, item)
            if to_disk:
                path = text_npz_path(item.path, cache_dir)
                valid = is_cached(path, caption, apply_t5_attn_mask, length, pooled_width(clip_l))
                item.text_npz = path if valid else None  # set again once the file holds its entry
                if valid:
                    remove_stale_temporaries(path)  # a process killed after the rename, before its clean-up
                    reused += 1
                    continue
            todo.append((item, caption))
    if progress and todo:
        progress("caching text-encoder outputs", 0, len(todo))  # a cancel raised here comes before any encoding
    done = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        captions = [caption for _, caption in chunk]
        with torch.no_grad():
            pooled = clip_l.encode(captions).float().cpu()
            ids, mask = t5.tokenize(captions)
            t5_out = t5(ids, mask if apply_t5_attn_mask else None).float().cpu()
        for i, (item, caption) in enumerate(chunk):
            if to_disk:
                path = text_npz_path(item.path, cache_dir)
                write_npz(path, {
                    "l_pooled": pooled[i].numpy(), "t5_out": t5_out[i].numpy(),
                    "txt_ids": np.zeros((length, 3), dtype=np.float32), "t5_attn_mask": mask[i].numpy(),
                    "apply_t5_attn_mask": np.array(apply_t5_attn_mask),
                    "caption_sha256": np.array(caption_sha256(caption)),
                })
                item.text_npz = path
            else:
                item.text = (pooled[i], t5_out[i], mask[i])
        done += len(chunk)
        if progress:
            progress("caching text-encoder outputs", done, len(todo))
    return {"encoded": len(todo), "reused": reused}


__all__ = ["KEYS", "Progress", "cache_text_outputs", "check_text_caching", "fixed_caption", "is_cached",
           "read_text_entry", "text_npz_path"]

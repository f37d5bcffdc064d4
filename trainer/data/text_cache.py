"""Text-encoder output cache, in memory or on disk in sd-scripts' format: `<stem>_flux_te.npz` with `l_pooled` [768],
`t5_out` [L, 4096], `txt_ids` [L, 3], `t5_attn_mask` [L] and `apply_t5_attn_mask`.

Beyond sd-scripts: `caption_sha256` records the caption the outputs came from, so an edited caption is re-encoded.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .captions import caption_is_random
from .dataset import DatasetError, DatasetGroup, FluxDataset, ImageItem
from .npz import read_npz, write_npz

KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask")
Progress = Callable[[str, int, int], None]


def text_npz_path(image: Path) -> Path:
    return image.with_name(image.stem + "_flux_te.npz")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_text_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    data = read_npz(path)
    if data is None or not all(k in data for k in KEYS):
        return None
    return (torch.from_numpy(data["l_pooled"]), torch.from_numpy(data["t5_out"]),
            torch.from_numpy(data["t5_attn_mask"].astype(np.int64)))


def is_cached(path: Path, caption: str, apply_mask: bool, length: int) -> bool:
    data = read_npz(path)
    if data is None or not all(k in data for k in KEYS):
        return False
    if bool(data["apply_t5_attn_mask"]) != apply_mask or data["t5_out"].shape[0] != length:
        return False
    return "caption_sha256" not in data or str(data["caption_sha256"]) == _sha(caption)


def check_text_caching(group: DatasetGroup, train_t5xxl: bool = False) -> None:
    if train_t5xxl:
        raise DatasetError("train_t5xxl trains T5 itself, so its outputs cannot be cached; turn off "
                           "--cache_text_encoder_outputs")
    for dataset in group.datasets:
        for i, subset in enumerate(dataset.config.subsets):
            if caption_is_random(subset):
                options = [o for o in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                                       "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
                           if getattr(subset, o)]
                raise DatasetError(f"{dataset.name} subset {i + 1} ({subset.image_dir}): {', '.join(options)} change the "
                                   "caption every step, so text-encoder outputs cannot be cached; turn off "
                                   "--cache_text_encoder_outputs or those options")


def fixed_caption(dataset: FluxDataset, item: ImageItem) -> str:
    """The caption as trained when nothing random applies (prefix, suffix, separators)."""
    return dataset.caption_for(item, random.Random(0))


def cache_text_outputs(group: DatasetGroup, clip_l, t5, to_disk: bool, batch_size: int = 1,
                       apply_t5_attn_mask: bool = False, progress: Progress | None = None) -> dict[str, int]:
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
                item.text_npz = text_npz_path(item.path)
                if is_cached(item.text_npz, caption, apply_t5_attn_mask, length):
                    reused += 1
                    continue
            todo.append((item, caption))
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
                write_npz(item.text_npz, {
                    "l_pooled": pooled[i].numpy(), "t5_out": t5_out[i].numpy(),
                    "txt_ids": np.zeros((length, 3), dtype=np.float32), "t5_attn_mask": mask[i].numpy(),
                    "apply_t5_attn_mask": np.array(apply_t5_attn_mask), "caption_sha256": np.array(_sha(caption)),
                })
            else:
                item.text = (pooled[i], t5_out[i], mask[i])
        done += len(chunk)
        if progress:
            progress("caching text-encoder outputs", done, len(todo))
    return {"encoded": len(todo), "reused": reused}

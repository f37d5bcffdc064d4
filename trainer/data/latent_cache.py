"""Latent cache, in memory or on disk in sd-scripts' format: `<stem>_<W>x<H>_flux.npz` (W x H the image's own size)
holding `latents_<h>x<w>`, `original_size_<h>x<w>`, `crop_ltrb_<h>x<w>` and, when used, `latents_flipped_<h>x<w>`
and `alpha_mask_<h>x<w>` for each bucket (h, w in latent pixels), so one file serves every resolution.

Beyond sd-scripts (which ignores extra keys): `source_stat` and `source_sha256` record the image the latents came
from, so an edited image is re-encoded, not silently trained from stale latents.
"""

from __future__ import annotations

import logging
from itertools import groupby
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .buckets import Size, crop_ltrb
from .dataset import DatasetError, DatasetGroup, FluxDataset, ImageItem
from .npz import file_sha256, file_stat, read_npz, write_npz

log = logging.getLogger(__name__)
LATENT_STRIDE = 8
Progress = Callable[[str, int, int], None]


def latent_npz_path(image: Path, size: Size) -> Path:
    return image.with_name(f"{image.stem}_{size[0]:04d}x{size[1]:04d}_flux.npz")


def _suffix(bucket: Size) -> str:
    return f"_{bucket[1] // LATENT_STRIDE}x{bucket[0] // LATENT_STRIDE}"


def read_entry(path: Path, bucket: Size) -> dict | None:
    data = read_npz(path)
    if data is None:
        return None
    s = _suffix(bucket)
    if "latents" + s not in data:
        return None
    return {"latents": data["latents" + s], "latents_flipped": data.get("latents_flipped" + s),
            "alpha_mask": data.get("alpha_mask" + s), "original_size": data.get("original_size" + s),
            "crop_ltrb": data.get("crop_ltrb" + s)}


def _source_matches(data: dict, image: Path) -> bool:
    if "source_stat" not in data:
        return True  # written by sd-scripts: trusted as sd-scripts trusts it
    if str(data["source_stat"]) == file_stat(image):
        return True
    return "source_sha256" in data and str(data["source_sha256"]) == file_sha256(image)


def is_cached(path: Path, item: ImageItem) -> bool:
    data = read_npz(path)
    if data is None:
        return False
    s = _suffix(item.bucket)
    needed = ["latents" + s] + (["latents_flipped" + s] if item.subset.flip_aug else []) + (
        ["alpha_mask" + s] if item.subset.alpha_mask else [])
    if not all(k in data for k in needed):
        return False
    expected = (16, item.bucket[1] // LATENT_STRIDE, item.bucket[0] // LATENT_STRIDE)
    return tuple(data["latents" + s].shape[-3:]) == expected and _source_matches(data, item.path)


def check_latent_caching(group: DatasetGroup) -> None:
    """Cached latents are fixed, so per-step pixel augmentations cannot be used with them."""
    for dataset in group.datasets:
        for i, subset in enumerate(dataset.config.subsets):
            for option in ("color_aug", "random_crop"):
                if getattr(subset, option):
                    raise DatasetError(f"{dataset.name} subset {i + 1} ({subset.image_dir}): {option} changes the image "
                                       "every step, so its latents cannot be cached; turn off --cache_latents or "
                                       f"{option}")


def cache_latents(group: DatasetGroup, ae, to_disk: bool, batch_size: int = 1, seed: int = 0,
                  progress: Progress | None = None) -> dict[str, int]:
    """Encode every image of every dataset once (flipped too with flip_aug); reuse valid disk caches. Disk caches
    are written batch by batch, so an interrupted run continues where it stopped."""
    check_latent_caching(group)
    todo: list[tuple[FluxDataset, ImageItem]] = []
    reused = 0
    for dataset in group.datasets:
        for item in dataset.items:
            if item.repeats == 0:
                continue
            if to_disk:
                item.latent_npz = latent_npz_path(item.path, item.size)
                if is_cached(item.latent_npz, item):
                    reused += 1
                    continue
            todo.append((dataset, item))
    todo.sort(key=lambda pair: pair[1].bucket)
    by_bucket = [list(group) for _, group in groupby(todo, key=lambda pair: pair[1].bucket)]
    chunks = [group[i:i + batch_size] for group in by_bucket for i in range(0, len(group), batch_size)]
    device = next(ae.parameters()).device
    done = 0
    for number, chunk in enumerate(chunks):  # one size per encoder batch
        _encode_chunk(chunk, ae, device, to_disk, seed + number)
        done += len(chunk)
        if progress:
            progress("caching latents", done, len(todo))
    return {"encoded": len(todo), "reused": reused}


def _encode_chunk(chunk, ae, device, to_disk: bool, seed: int) -> None:
    pixels, masks = [], []
    for dataset, item in chunk:
        image, mask = dataset.load_image(item)
        pixels.append(torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0))
        masks.append(mask)
    batch = torch.stack(pixels).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        latents = ae.encode(batch, generator=generator).float().cpu().numpy()
        flipped = None
        if any(item.subset.flip_aug for _, item in chunk):
            flipped = ae.encode(torch.flip(batch, dims=[3]), generator=generator).float().cpu().numpy()
    for i, (_, item) in enumerate(chunk):
        entry = {"latents": latents[i], "original_size": np.array(item.size),
                 "crop_ltrb": np.array(crop_ltrb(item.bucket, item.size)),
                 "latents_flipped": flipped[i] if flipped is not None and item.subset.flip_aug else None,
                 "alpha_mask": masks[i]}
        if to_disk:
            _write(item, entry)
        else:
            item.latents = entry


def _write(item: ImageItem, entry: dict) -> None:
    arrays = read_npz(item.latent_npz) or {}
    s = _suffix(item.bucket)
    for key, value in entry.items():
        if value is not None:
            arrays[key + s] = value
    arrays["source_stat"] = np.array(file_stat(item.path))
    arrays["source_sha256"] = np.array(file_sha256(item.path))
    write_npz(item.latent_npz, arrays)

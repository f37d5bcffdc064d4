"""Latent cache: encodes each image once with the autoencoder, into memory or into the disk files described in
cache_files (sd-scripts' format), reusing valid files and re-encoding when the image changed.
"""

from __future__ import annotations

import logging
import zlib
from itertools import groupby
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import remove_stale_temporaries
from .buckets import crop_ltrb
from .cache_files import LATENT_STRIDE, bucket_suffix, latent_npz_path, latent_stride, read_entry, shared_cache_files
from .dataset import DatasetError, DatasetGroup, FluxDataset, ImageItem
from .npz import file_sha256, file_stat, read_npz, write_npz

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


def _source_matches(data: dict, image: Path) -> bool:
    if "source_stat" not in data:
        return True  # written by sd-scripts: trusted as sd-scripts trusts it
    if str(data["source_stat"]) == file_stat(image):
        return True
    return "source_sha256" in data and str(data["source_sha256"]) == file_sha256(image)


def is_cached(path: Path, item: ImageItem, stride: int = LATENT_STRIDE) -> bool:
    data = read_npz(path)
    if data is None:
        return False
    s = bucket_suffix(item.bucket)
    needed = ["latents" + s] + (["latents_flipped" + s] if item.subset.flip_aug else []) + (
        ["alpha_mask" + s] if item.subset.alpha_mask else [])
    if not all(k in data for k in needed):
        return False
    expected = (16, item.bucket[1] // stride, item.bucket[0] // stride)
    return tuple(data["latents" + s].shape[-3:]) == expected and _source_matches(data, item.path)


def check_latent_caching(group: DatasetGroup) -> None:
    """Cached latents are fixed, so per-step pixel augmentations cannot be used with them."""
    for dataset in group.datasets:
        for i, subset in enumerate(dataset.config.subsets):
            changing = subset.options_changing_images()
            if changing:
                raise DatasetError(f"{dataset.name} subset {i + 1} ({subset.image_dir}): {changing[0]} changes the "
                                   "image every step, so its latents cannot be cached; turn off --cache_latents "
                                   f"or {changing[0]}")


def check_cache_names(group: DatasetGroup, cache_dir: str | Path | None = None) -> None:
    """Two images whose disk caches would be one file (x.png and x.jpg of one size in one folder) would train on
    each other's latents: refused, naming both. sd-scripts' file names are kept rather than made unique, so its
    caches and ours stay interchangeable; renaming one image is the fix."""
    images = [(item.path, item.size) for dataset in group.datasets for item in dataset.items if item.repeats]
    clashes = shared_cache_files(list(dict.fromkeys(images)), cache_dir)
    if clashes:
        first, second, path = clashes[0]
        more = f" (and {len(clashes) - 1} more pair(s))" if len(clashes) > 1 else ""
        raise DatasetError(f"{first} and {second} would share the latent cache file {path.name} (sd-scripts names "
                           f"it by stem and size only){more}: rename one of them, or cache latents in memory "
                           "(without --cache_latents_to_disk)")


def cache_latents(group: DatasetGroup, ae, to_disk: bool, batch_size: int = 1, seed: int = 0,
                  progress: Progress | None = None, cache_dir: str | Path | None = None) -> dict[str, int]:
    """Encode every image of every dataset once (flipped too with flip_aug); reuse valid disk caches. Disk caches
    are written batch by batch, each file atomically, so an interrupted run continues where it stopped.

    `progress(phase, done, total)` is called with done=0 before the first batch and after each batch; an exception
    it raises stops caching there: every file written so far is complete, and each item holds a valid entry (its
    latents in memory, or latent_npz naming a file with its entry) or none (latent_npz is None)."""
    check_latent_caching(group)
    if to_disk:
        check_cache_names(group, cache_dir)
    stride = latent_stride(ae)
    todo: list[tuple[FluxDataset, ImageItem]] = []
    reused = 0
    for dataset in group.datasets:
        for item in dataset.items:
            if item.repeats == 0:
                continue
            if to_disk:
                path = latent_npz_path(item.path, item.size, cache_dir)
                # set again once the file holds its entry
                item.latent_npz = path if is_cached(path, item, stride) else None
                if item.latent_npz is not None:
                    remove_stale_temporaries(path)  # a process killed after the rename, before its clean-up
                    reused += 1
                    continue
            todo.append((dataset, item))
    todo.sort(key=lambda pair: pair[1].bucket)
    by_bucket = [list(group) for _, group in groupby(todo, key=lambda pair: pair[1].bucket)]
    chunks = [group[i:i + batch_size] for group in by_bucket for i in range(0, len(group), batch_size)]
    device = next(ae.parameters()).device
    if progress and todo:
        progress("caching latents", 0, len(todo))  # a cancel raised here comes before any encoding
    done = 0
    for chunk in chunks:  # one size per encoder batch
        _encode_chunk(chunk, ae, device, to_disk, seed, cache_dir)
        done += len(chunk)
        if progress:
            progress("caching latents", done, len(todo))
    return {"encoded": len(todo), "reused": reused}


def _posterior_noise(chunk, channels: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's draws from the autoencoder's posterior, from a generator of its own (seed, file name, bucket):
    an image's cached latents do not depend on which images were cached with it or before it, so a caching run
    stopped and continued writes exactly what one uninterrupted run writes."""
    noises, flipped = [], []
    for _, item in chunk:
        key = zlib.crc32(f"{item.path.name}:{item.bucket[0]}x{item.bucket[1]}".encode())
        generator = torch.Generator().manual_seed((seed * 1_000_003 + key) % 2**63)
        noises.append(torch.randn((channels, height, width), generator=generator))
        flipped.append(torch.randn((channels, height, width), generator=generator))
    return torch.stack(noises), torch.stack(flipped)


def _encode_chunk(chunk, ae, device, to_disk: bool, seed: int, cache_dir: str | Path | None) -> None:
    pixels, masks = [], []
    for dataset, item in chunk:
        image, mask = dataset.load_image(item)
        pixels.append(torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0))
        masks.append(mask)
    batch = torch.stack(pixels).to(device)
    stride = latent_stride(ae)
    noise, flipped_noise = _posterior_noise(chunk, ae.params.z_channels, batch.shape[2] // stride,
                                            batch.shape[3] // stride, seed)
    with torch.no_grad():
        latents = ae.encode(batch, noise=noise.to(device)).float().cpu().numpy()
        flipped = None
        if any(item.subset.flip_aug for _, item in chunk):
            flipped = ae.encode(torch.flip(batch, dims=[3]), noise=flipped_noise.to(device)).float().cpu().numpy()
    for i, (_, item) in enumerate(chunk):
        entry = {"latents": latents[i], "original_size": np.array(item.size),
                 "crop_ltrb": np.array(crop_ltrb(item.bucket, item.size)),
                 "latents_flipped": flipped[i] if flipped is not None and item.subset.flip_aug else None,
                 "alpha_mask": masks[i] if item.mask_path is None else None}  # mask images: read each step
        if to_disk:
            path = latent_npz_path(item.path, item.size, cache_dir)
            _write(path, item, entry)
            item.latent_npz = path
        else:
            item.latents = entry


def _write(path: Path, item: ImageItem, entry: dict) -> None:
    """Add the item's entry to its file (other buckets' entries stay), replacing the file in one rename."""
    arrays = read_npz(path) or {}
    if arrays and not _source_matches(arrays, item.path):  # other buckets' entries came from an older image
        arrays = {}
    s = bucket_suffix(item.bucket)
    for key, value in entry.items():
        if value is not None:
            arrays[key + s] = value
    arrays["source_stat"] = np.array(file_stat(item.path))
    arrays["source_sha256"] = np.array(file_sha256(item.path))
    write_npz(path, arrays)


__all__ = ["LATENT_STRIDE", "Progress", "cache_latents", "check_cache_names", "check_latent_caching", "is_cached",
           "latent_npz_path", "read_entry"]

"""The on-disk cache formats (sd-scripts' own): what a cache file is called, which keys it holds, and reading an entry
back. Filling the files is latent_cache's and text_cache's job; this module knows neither them nor the datasets.

Latents: `<stem>_<W>x<H>_flux.npz` (W x H the image's own size) holding `latents_<h>x<w>`, `original_size_<h>x<w>`,
`crop_ltrb_<h>x<w>` and, when used, `latents_flipped_<h>x<w>` and `alpha_mask_<h>x<w>` for each bucket (h, w in
latent pixels), so one file serves every resolution. Beyond sd-scripts (which ignores extra keys): `source_stat` and
`source_sha256` record the image the latents came from (see npz.file_stat and npz.file_sha256).

Text-encoder outputs: `<stem>_flux_te.npz` with `l_pooled` [768], `t5_out` [L, 4096], `txt_ids` [L, 3],
`t5_attn_mask` [L] and `apply_t5_attn_mask`. Beyond sd-scripts: `caption_sha256` records the caption the outputs
came from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .buckets import Size
from .npz import read_npz

LATENT_STRIDE = 8
TEXT_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask")


# ---------------------------------------------------------------------------------------------------------- latents

def cache_folder(image: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Beside the image (sd-scripts), or under `cache_dir` in a subfolder per image folder, so the image folder is
    only ever read."""
    if cache_dir is None:
        return image.parent
    key = hashlib.sha256(str(image.parent.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{image.parent.name}-{key}"


def latent_npz_path(image: Path, size: Size, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_folder(image, cache_dir) / f"{image.stem}_{size[0]:04d}x{size[1]:04d}_flux.npz"


def latent_stride(ae) -> int:
    """Image pixels per latent pixel of an autoencoder (FLUX's: 8)."""
    return ae.params.downscale


def shared_cache_files(images: list[tuple[Path, Size]], cache_dir: str | os.PathLike | None = None
                       ) -> list[tuple[Path, Path, Path]]:
    """(image, other image, cache file) for each pair of different images whose latent caches would be one file:
    sd-scripts' name keeps only the stem and the size, so x.png and x.jpg of one size in one folder share it."""
    owner: dict[Path, Path] = {}
    clashes = []
    for image, size in images:
        path = latent_npz_path(image, size, cache_dir)
        first = owner.setdefault(path, image)
        if first != image:
            clashes.append((first, image, path))
    return clashes


def bucket_suffix(bucket: Size) -> str:
    """The key suffix of one bucket's entries: `_<h>x<w>` in latent pixels."""
    return f"_{bucket[1] // LATENT_STRIDE}x{bucket[0] // LATENT_STRIDE}"


def read_entry(path: Path, bucket: Size) -> dict | None:
    """One bucket's latents, latents_flipped, alpha_mask, original_size and crop_ltrb (None when absent), or None
    if the file is missing, damaged or has no latents for that bucket."""
    data = read_npz(path)
    if data is None:
        return None
    s = bucket_suffix(bucket)
    if "latents" + s not in data:
        return None
    return {"latents": data["latents" + s], "latents_flipped": data.get("latents_flipped" + s),
            "alpha_mask": data.get("alpha_mask" + s), "original_size": data.get("original_size" + s),
            "crop_ltrb": data.get("crop_ltrb" + s)}


# ------------------------------------------------------------------------------------------------------------- text

def text_npz_path(image: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_folder(image, cache_dir) / (image.stem + "_flux_te.npz")


def caption_sha256(caption: str) -> str:
    """The `caption_sha256` value of a caption."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def read_text_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(pooled, t5_out, t5_mask as int64), or None if the file is missing, damaged or incomplete."""
    data = read_npz(path)
    if data is None or not all(k in data for k in TEXT_KEYS):
        return None
    return (torch.from_numpy(data["l_pooled"]), torch.from_numpy(data["t5_out"]),
            torch.from_numpy(data["t5_attn_mask"].astype(np.int64)))

"""Datasets: the images of each subset with their captions and buckets, and batches drawn within one bucket.

Order and augmentation are reproducible: each epoch's shuffle comes from `seed + epoch` and each item's random
choices from (seed, epoch, batch, position), so a resumed run sees exactly what an uninterrupted one would.

With `validation_split`, each subset's images are shuffled with the validation seed (the training seed when none is
given) and split as sd-scripts' split_train_val does: the first ceil(n x (1 - split)) train, the rest are held out.
A training dataset never sees its held-out images; `build_validation_datasets` builds the held-out ones (each image
once, no regularisation images, fixed order and augmentation draws).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config.data import DatasetConfig, SubsetConfig
from ..errors import DatasetError
from .buckets import BucketPlanner, Size
from .cache_files import read_entry, read_text_entry
from .captions import CaptionError, process_caption, read_caption
from .images import SkippedReport, color_aug, list_images, load_rgb, probe_all, resize_and_crop, to_tensor

log = logging.getLogger(__name__)
# Images x repeats one epoch of one dataset may hold: each is an entry in the epoch's order (sd-scripts lists them
# the same way), so num_repeats = 1e9 would fill memory before the first step. Far above any real LoRA dataset
# (10,000 images x 100 repeats).
MAX_SAMPLES_PER_EPOCH = 1_000_000


def check_samples_per_epoch(where: str, samples: int, how: str) -> None:
    """Refuse an epoch of more than MAX_SAMPLES_PER_EPOCH samples, naming `where` and how they add up."""
    if samples > MAX_SAMPLES_PER_EPOCH:
        raise DatasetError(f"{where}: {how} = {samples:,} samples per epoch, over the limit of "
                           f"{MAX_SAMPLES_PER_EPOCH:,}; lower num_repeats (more epochs give the same training)")


@dataclass
class ImageItem:
    path: Path
    caption: str
    subset: SubsetConfig
    size: Size  # displayed (width, height)
    bucket: Size = (0, 0)
    resized: Size = (0, 0)
    repeats: int = 1
    latents: dict | None = None  # in-memory latent cache, the entry as cache_files.read_entry returns it
    latent_npz: Path | None = None
    text: tuple | None = None  # in-memory text cache: (pooled, t5_out, t5_mask)
    text_npz: Path | None = None
    mask_path: Path | None = None  # its mask image, when the subset has conditioning_data_dir


@dataclass
class Batch:
    bucket: Size
    paths: list[Path]
    captions: list[str]
    loss_weights: torch.Tensor  # [B]: prior_loss_weight for regularisation images, else 1
    network_multiplier: float
    images: torch.Tensor | None = None  # [B, 3, H, W] in [-1, 1] when latents are not cached
    latents: torch.Tensor | None = None  # [B, 16, H/8, W/8] from the latent cache
    alpha_masks: torch.Tensor | None = None  # [B, H, W] in [0, 1]: alpha_mask or mask images (1 for unmasked ones)
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # cached (pooled, t5_out, t5_mask)
    flipped: list[bool] = field(default_factory=list)
    custom_attributes: list[dict] = field(default_factory=list)  # per sample: its subset's custom_attributes ({})
    positions: list[int] = field(default_factory=list)  # each sample's place in the whole (all-process) batch
    loss_scale: float = 1.0  # this slice's share of the whole batch x processes (1.0 in one process)


def _metadata_captions(subset: SubsetConfig) -> dict[Path, str]:
    """Fine-tune style captions: {"image key": {"caption": ..., "tags": ...}} with keys as paths or stems."""
    from ..tomlio import loads_json, read_text

    path = Path(subset.metadata_file)
    try:
        entries = loads_json(read_text(path))  # NotText and JSON's errors are ValueErrors
    except (OSError, ValueError) as e:
        raise DatasetError(f"metadata_file {path}: cannot be read as JSON ({e})") from e
    base = Path(subset.image_dir) if subset.image_dir else path.parent
    out = {}
    for key, entry in entries.items():
        extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
        candidates = [Path(key), base / key] + [base / (key + ext) for ext in extensions]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            log.warning("metadata_file %s: no image found for '%s'", path, key)
            continue
        caption = entry.get("caption") or ""
        tags = entry.get("tags")
        out[image] = f"{caption}, {tags}" if caption and tags else caption or tags or ""
    return out


def split_train_val(paths: list[Path], split: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(training, held out): `paths` shuffled by `random.Random(seed)` (the permutation sd-scripts' split_train_val
    draws after `random.seed(validation_seed)`), the first ceil(n x (1 - split)) for training, the rest held out.
    sd-scripts takes its validation images from index n - round(n x split), which overlaps the training part by one
    image when n x split ends in .5 and rounds up; here the two parts never overlap."""
    if split <= 0 or not paths:
        return list(paths), []
    order = list(paths)
    random.Random(seed).shuffle(order)
    keep = math.ceil(len(order) * (1 - split))
    return order[:keep], order[keep:]


def _subset_items(subset: SubsetConfig, validation: bool = False, split: float = 0.0,
                  split_seed: int = 0) -> tuple[list[ImageItem], dict[Path, str], list[Path], list[Path]]:
    """Items of one subset (its training part, or with `validation` its held-out part), the problems of its skipped
    files, the images that had no caption, and the images held out from training."""
    if subset.metadata_file:
        captions = _metadata_captions(subset)
        paths = sorted(captions)
    else:
        folder = Path(subset.image_dir)
        if not folder.is_dir():
            raise DatasetError(f"image_dir {folder}: not a folder")
        paths = list_images(folder)
        captions = {}
    if not validation:  # before any image is read: the count of files is enough
        check_samples_per_epoch(f"subset {subset.image_dir or subset.metadata_file}", len(paths) * subset.num_repeats,
                                f"{len(paths):,} image(s) x {subset.num_repeats:,} repeat(s)")
    held_out: list[Path] = []
    if split > 0:
        if subset.is_reg:  # sd-scripts: regularisation images are never split; all of them train
            paths = [] if validation else paths
        else:
            paths, held_out = split_train_val(paths, split, split_seed)
            paths = sorted(held_out if validation else paths)
    sizes, problems = probe_all(paths)
    items, uncaptioned = [], []
    for path in paths:
        if path not in sizes:
            continue
        if subset.metadata_file:
            caption = captions[path]
        else:
            try:
                caption = read_caption(path, subset.caption_extension, subset.enable_wildcard)
            except CaptionError as e:
                problems[path] = str(e)
                continue
            if caption is None:
                uncaptioned.append(path)
                caption = subset.class_tokens or ""
        items.append(ImageItem(path, caption, subset, sizes[path], repeats=1 if validation else subset.num_repeats))
    if subset.conditioning_data_dir is not None:
        pair_mask_images(subset, items)
    return items, problems, uncaptioned, held_out


def pair_mask_images(subset: SubsetConfig, items: list[ImageItem]) -> None:
    """Each image's mask image: the file in conditioning_data_dir with the image's name (any image extension), of
    the image's size. A missing, ambiguous, unreadable or wrongly sized mask is refused, naming the images, as
    sd-scripts refuses missing ones (a mask-less image would silently train everywhere)."""
    folder = Path(subset.conditioning_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"conditioning_data_dir {folder}: not a folder (subset {subset.image_dir})")
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(folder):
        by_stem.setdefault(path.stem, []).append(path)
    missing = [item.path.name for item in items if item.path.stem not in by_stem]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(f"conditioning_data_dir {folder}: no mask image for {len(missing)} image(s) of "
                           f"{subset.image_dir}: {shown} (each needs a mask of the same name, e.g. "
                           f"{Path(missing[0]).stem}.png)")
    ambiguous = [paths for item in items if len(paths := by_stem[item.path.stem]) > 1]
    if ambiguous:
        raise DatasetError(f"conditioning_data_dir {folder}: several mask images for one image: "
                           f"{', '.join(p.name for p in ambiguous[0])}; keep one")
    for item in items:
        item.mask_path = by_stem[item.path.stem][0]
    _check_mask_sizes(items)
    unused = sorted(set(by_stem) - {item.path.stem for item in items})
    if unused:
        log.info("conditioning_data_dir %s: %d mask image(s) without a training image here (e.g. %s)", folder,
                 len(unused), by_stem[unused[0]][0].name)


def _check_mask_sizes(items: list[ImageItem]) -> None:
    sizes, problems = probe_all([item.mask_path for item in items])
    for item in items:
        if item.mask_path in problems:
            raise DatasetError(f"mask image {item.mask_path}: {problems[item.mask_path]}")
        if sizes[item.mask_path] != item.size:
            (w, h), (mw, mh) = item.size, sizes[item.mask_path]
            raise DatasetError(f"mask image {item.mask_path} is {mw}x{mh} but its image {item.path} is {w}x{h}: a "
                               "mask must be the size of its image")


class FluxDataset:
    """The training part of a dataset, or with `validation=True` its held-out part (see the module's note)."""

    def __init__(self, config: DatasetConfig, seed: int = 0, name: str = "dataset", validation: bool = False):
        self.config = config
        self.seed = seed
        self.name = name
        self.validation = validation
        self.validation_seed = config.validation_seed if config.validation_seed is not None else seed
        self.items: list[ImageItem] = []
        self.held_out: list[Path] = []  # the images kept out of training for the validation loss
        problems: dict[Path, str] = {}
        self.uncaptioned: list[Path] = []  # no caption file: trained with the class tokens, or an empty caption
        uncaptioned: list[Path] = []  # ... and no class tokens either
        for subset in config.subsets:
            items, subset_problems, missing, held_out = _subset_items(subset, validation, config.validation_split,
                                                                      self.validation_seed)
            self.items += items
            check_samples_per_epoch(name, sum(i.repeats for i in self.items), "its subsets' images x repeats")
            self.held_out += held_out
            problems.update(subset_problems)
            self.uncaptioned += missing
            uncaptioned += [p for p in missing if not subset.class_tokens]
        self.skipped = SkippedReport(problems)
        if problems:
            log.warning("%s: %s", name, self.skipped.message())
        if uncaptioned:
            log.warning("%s: %d image(s) have no caption file and no class_tokens; they train with an empty caption "
                        "(e.g. %s)", name, len(uncaptioned), uncaptioned[0])
        train = [i for i in self.items if not i.subset.is_reg]
        if not train and not validation:
            where = ", ".join(str(s.image_dir or s.metadata_file) for s in config.subsets)
            detail = f" ({len(problems)} file(s) could not be used)" if problems else ""
            raise DatasetError(f"{name}: no usable training images in {where}{detail}")
        self._balance_regularisation(train)
        self.planner = BucketPlanner(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                                     config.bucket_reso_steps, config.bucket_no_upscale, config.enable_bucket)
        for item in self.items:
            choice = self.planner.choose(*item.size)
            item.bucket, item.resized = choice.bucket, choice.resized
        self.buckets: dict[Size, list[int]] = {}
        for index, item in enumerate(self.items):
            self.buckets.setdefault(item.bucket, []).extend([index] * item.repeats)
        self.buckets = dict(sorted(self.buckets.items()))
        self.epoch = -1
        self.set_epoch(0)

    def _balance_regularisation(self, train: list[ImageItem]) -> None:
        """sd-scripts' rule: regularisation images are taken, with their repeats, until they match the training
        images in number; if one pass is not enough, they are repeated once more each, in turn."""
        reg = [i for i in self.items if i.subset.is_reg]
        if not reg:
            return
        target = sum(i.repeats for i in train)
        for item in reg:
            item.repeats = 0
        count, first = 0, True
        while count < target:
            for item in reg:
                item.repeats += item.subset.num_repeats if first else 1
                count += item.subset.num_repeats if first else 1
                if count >= target:
                    break
            first = False

    # ------------------------------------------------------------------------------------------------ order

    def bucket_table(self) -> list[tuple[Size, int]]:
        """(bucket size, images including repeats), as sd-scripts logs it."""
        return [(size, len(indices)) for size, indices in self.buckets.items()]

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        rng = random.Random(self.seed + epoch)
        batch_size = self.config.batch_size
        self.batches: list[tuple[Size, list[int]]] = []
        for size, indices in self.buckets.items():
            order = indices[:]
            rng.shuffle(order)
            self.batches += [(size, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
        rng.shuffle(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    # ------------------------------------------------------------------------------------------------ items

    def item_rng(self, batch_index: int, position: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{batch_index}:{position}")

    def caption_for(self, item: ImageItem, rng: random.Random, step: int = 0, max_train_steps: int = 0) -> str:
        # sd-scripts counts epochs from 1 in its captions (caption_dropout_every_n_epochs drops in epochs N, 2N, ...)
        return process_caption(item.caption, item.subset, rng, self.epoch + 1, step, max_train_steps)

    def load_image(self, item: ImageItem, rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 at bucket size and the loss mask (float32 [H, W]) when the subset has one: its mask image's,
        else the alpha channel with alpha_mask."""
        pixels = load_rgb(item.path, with_alpha=item.subset.alpha_mask)
        crop_rng = rng if (rng is not None and item.subset.random_crop) else None
        mask_rng = None
        if crop_rng is not None:  # the mask's crop makes the same random draws as the image's
            mask_rng = random.Random()
            mask_rng.setstate(crop_rng.getstate())
        pixels = resize_and_crop(pixels, item.resized, item.bucket, self._interpolation(item), crop_rng)
        if item.mask_path is not None:
            return pixels[..., :3], self.load_mask_image(item, mask_rng)
        mask = pixels[..., 3].astype(np.float32) / 255.0 if item.subset.alpha_mask else None
        return pixels[..., :3], mask

    def load_mask_image(self, item: ImageItem, crop_rng: random.Random | None = None) -> np.ndarray:
        """The item's mask image (its R channel / 255, float32 [H, W]) resized and cropped exactly as its image.
        The mask is read as RGB, like the image, so both go through the same filter."""
        mask = load_rgb(item.mask_path)
        if (mask.shape[1], mask.shape[0]) != tuple(item.size):
            raise DatasetError(f"mask image {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                               f"{item.path} is {item.size[0]}x{item.size[1]}: a mask must be the size of its image")
        mask = resize_and_crop(mask, item.resized, item.bucket, self._interpolation(item), crop_rng)
        return mask[..., 0].astype(np.float32) / 255.0

    def _interpolation(self, item: ImageItem) -> str | None:
        return item.subset.resize_interpolation or self.config.resize_interpolation

    def batch(self, index: int, step: int = 0, max_train_steps: int = 0, part: tuple[int, int] = (0, 1)) -> Batch:
        """Batch `index` of this epoch; with `part` = (rank, world), that process's equal slice of it (random
        choices depend on the position in the whole batch, so the slices together equal the whole)."""
        size, indices = self.batches[index]
        rank, world = part
        share = -(-len(indices) // world)
        chosen = list(enumerate(indices))[rank * share:(rank + 1) * share]
        idle = not chosen  # fewer images than processes: repeat one with weight 0 so every process steps together
        if idle:
            chosen = list(enumerate(indices))[-1:]
        out = Batch(size, [], [], torch.empty(0), self.config.network_multiplier)
        out.positions = [position for position, _ in chosen]
        images, latents, masks, texts, weights = [], [], [], [], []
        for position, item_index in chosen:
            item = self.items[item_index]
            rng = self.item_rng(index, position)
            flipped = item.subset.flip_aug and rng.random() < 0.5
            cached = self._cached_latents(item, flipped)
            if cached is not None:
                latents.append(cached[0])
                mask = cached[1]
                if item.mask_path is not None:  # read each step, so the latent cache never holds a stale mask
                    mask = self.load_mask_image(item)
                    mask = mask[:, ::-1] if flipped else mask
            else:
                pixels, mask = self.load_image(item, rng)
                if item.subset.color_aug:
                    pixels = color_aug(pixels, rng)
                if flipped:
                    pixels = pixels[:, ::-1]
                    mask = None if mask is None else mask[:, ::-1]
                images.append(to_tensor(np.ascontiguousarray(pixels)))
            masks.append(None if mask is None else torch.as_tensor(np.ascontiguousarray(mask)))
            text = self._cached_text(item)
            if text is not None:
                texts.append(text)
            out.paths.append(item.path)
            out.captions.append(self.caption_for(item, rng, step, max_train_steps))
            out.flipped.append(flipped)
            out.custom_attributes.append(dict(item.subset.custom_attributes or {}))
            weights.append(self.config.prior_loss_weight if item.subset.is_reg else 1.0)
        out.loss_weights = torch.tensor(weights) * (0.0 if idle else 1.0)
        # the slice's mean loss, rescaled so that DDP's average over processes is the mean over the whole batch
        out.loss_scale = (0 if idle else len(chosen)) * world / len(indices)
        if latents and images:
            raise DatasetError(f"{self.name}: latents are cached for some images of a batch but not others")
        out.latents = torch.stack(latents) if latents else None
        out.images = torch.stack(images) if images else None
        out.alpha_masks = _stack_masks(masks, size)
        if texts:
            if len(texts) != len(chosen):
                raise DatasetError(f"{self.name}: text-encoder outputs are cached for some captions of a batch only")
            out.text = tuple(torch.stack([t[k] for t in texts]) for k in range(3))
        return out

    def _cached_latents(self, item: ImageItem, flipped: bool):
        entry = item.latents
        if entry is None and item.latent_npz is not None:
            entry = read_entry(item.latent_npz, item.bucket)
        if entry is None:
            return None
        key = "latents_flipped" if flipped else "latents"
        mask = entry.get("alpha_mask")
        if mask is not None and flipped:
            mask = mask[:, ::-1]
        return torch.as_tensor(entry[key]), mask

    def _cached_text(self, item: ImageItem):
        if item.text is not None:
            return item.text
        if item.text_npz is not None:
            return read_text_entry(item.text_npz)
        return None

    # ------------------------------------------------------------------------------------------------ summary

    def summary(self) -> dict:
        """What sd-scripts records about a dataset in a LoRA's metadata."""
        dirs = {}
        tags: dict[str, Counter] = {}
        for item in self.items:
            key = Path(item.subset.image_dir or item.subset.metadata_file).name
            entry = dirs.setdefault(key, {"n_repeats": item.subset.num_repeats, "img_count": 0})
            entry["img_count"] += 1
            counter = tags.setdefault(key, Counter())
            counter.update(t.strip() for t in item.caption.split(item.subset.caption_separator) if t.strip())
        return {
            "num_train_images": sum(i.repeats for i in self.items if not i.subset.is_reg),
            "num_reg_images": sum(i.repeats for i in self.items if i.subset.is_reg),
            "num_batches_per_epoch": len(self),
            "resolution": list(self.config.resolution),
            "batch_size_per_device": self.config.batch_size,
            "enable_bucket": self.config.enable_bucket,
            "bucket_info": {"buckets": {str(i): {"resolution": list(size), "count": count}
                                        for i, (size, count) in enumerate(self.bucket_table())}},
            "dataset_dirs": dirs,
            "tag_frequency": {k: dict(v) for k, v in tags.items()},
        }


def _stack_masks(masks: list[torch.Tensor | None], size: Size) -> torch.Tensor | None:
    """[B, H, W] loss masks, or None when no sample has one; a sample without one (another subset, or an image with
    no alpha channel) weighs 1 everywhere, as in sd-scripts."""
    if all(m is None for m in masks):
        return None
    return torch.stack([torch.ones(size[1], size[0]) if m is None else m for m in masks])


class DatasetGroup:
    """Several datasets trained together (e.g. one folder at three resolutions); each epoch visits every batch of
    every dataset once, in an order drawn from the seed."""

    def __init__(self, datasets: list[FluxDataset], seed: int = 0):
        if not datasets:
            raise DatasetError("no datasets")
        self.datasets = datasets
        self.seed = seed
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = [(d, b) for d, ds in enumerate(self.datasets) for b in range(len(ds))]
            random.Random(self.seed * 7919 + epoch).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, index: int, step: int = 0, max_train_steps: int = 0, part: tuple[int, int] = (0, 1)) -> Batch:
        dataset, batch = self.order[index]
        return self.datasets[dataset].batch(batch, step, max_train_steps, part)

    def items(self):
        for dataset in self.datasets:
            yield from dataset.items

    def log_buckets(self, write: Callable[[str], None] = log.info) -> None:
        for dataset in self.datasets:
            write(f"{dataset.name}: resolution {dataset.config.resolution}, batch size {dataset.config.batch_size}")
            for i, (size, count) in enumerate(dataset.bucket_table()):
                write(f"  bucket {i}: {size[0]}x{size[1]}, {count} images")


def build_datasets(configs: list[DatasetConfig], seed: int = 0) -> DatasetGroup:
    """The training datasets (without their held-out validation images)."""
    return DatasetGroup([FluxDataset(c, seed, name=f"dataset {i + 1}") for i, c in enumerate(configs)], seed)


def build_validation_datasets(configs: list[DatasetConfig], seed: int = 0) -> DatasetGroup | None:
    """The held-out images of every dataset with a validation_split, one dataset each (same resolution, buckets
    and batch size as its training part); None when no image is held out (sd-scripts then validates nothing).
    Their order and augmentation draws are those of epoch 0, fixed for the whole run."""
    datasets = []
    for i, config in enumerate(configs):
        if config.validation_split <= 0:
            continue
        dataset = FluxDataset(config, seed, name=f"validation dataset {i + 1}", validation=True)
        if dataset.items:
            datasets.append(dataset)
        else:
            log.warning("dataset %d: validation_split %g holds out no image (too few images); no validation loss "
                        "from it", i + 1, config.validation_split)
    return DatasetGroup(datasets, seed) if datasets else None


__all__ = ["FluxDataset", "DatasetGroup", "Batch", "ImageItem", "DatasetError", "build_datasets",
           "build_validation_datasets", "split_train_val"]

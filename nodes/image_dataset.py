"""Datasets built in the graph: ComfyUI's IMAGE / MASK tensors and caption texts -> an ordinary image folder with
caption files, which the core then reads like any other.

The folder is named by a hash of what is written (pixels, masks, captions), so the same images are written once
and reused by every later run, and a changed image, mask or caption gives a new folder. Each file is written
atomically; a manifest written last marks the folder complete, so a crash half-way is rewritten, never trained on.

Pure torch/numpy/PIL (no ComfyUI): the node in nodes/dataset.py passes its inputs and a folder, tests call these
directly.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..trainer.errors import DatasetConfigError
from .translate import IMAGE_SET_CAPTION_EXTENSION as CAPTION_EXTENSION

MANIFEST = ".image_set.json"  # hidden, and not an image or caption suffix: the core never reads it
_HASH_VERSION = b"flux-lora-trainer image set v1\n"
_FOLDER_HASH_CHARS = 24


@dataclass(frozen=True)
class ImageSet:
    """What the node writes: uint8 RGB pictures [H, W, 3], optional uint8 alpha masks [H, W], one caption each
    ("" = none: the image uses the class tokens)."""

    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...] | None
    captions: tuple[str, ...]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(_HASH_VERSION)
        for i, image in enumerate(self.images):
            digest.update(f"image {image.shape[0]}x{image.shape[1]}\n".encode())
            digest.update(np.ascontiguousarray(image).tobytes())
            if self.masks is not None:
                digest.update(b"mask\n")
                digest.update(np.ascontiguousarray(self.masks[i]).tobytes())
            caption = self.captions[i].encode("utf-8")
            digest.update(f"caption {len(caption)}\n".encode())
            digest.update(caption)
        return digest.hexdigest()

    def file_stem(self, index: int) -> str:
        return f"{index + 1:0{max(4, len(str(len(self.images))))}d}"


@dataclass(frozen=True)
class WrittenSet:
    folder: Path
    fingerprint: str
    reused: bool  # True when an earlier run had written the same set


# ------------------------------------------------------------------------------------------ inputs -> arrays

def _pieces(value, what: str) -> list:
    """A tensor, or a (nested) list of tensors as ComfyUI passes list inputs, -> a flat list of tensors."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [piece for item in value for piece in _pieces(item, what)]
    if not hasattr(value, "shape"):
        raise DatasetConfigError(f"{what}: expected ComfyUI {what.upper()} tensors, got {type(value).__name__}")
    return [value]


def _to_uint8(tensor) -> np.ndarray:
    array = tensor.detach().cpu().float().clamp(0.0, 1.0).numpy()
    return np.rint(array * 255.0).astype(np.uint8)


def image_arrays(images) -> list[np.ndarray]:
    """IMAGE input(s): [B, H, W, C] batches or [H, W, C] pictures, of any sizes, in 0..1 -> uint8 RGB [H, W, 3]
    per picture, in order. One channel is grey; a fourth (alpha) is dropped (connect a MASK for loss weights)."""
    out = []
    for tensor in _pieces(images, "images"):
        batch = tensor if tensor.ndim == 4 else tensor.unsqueeze(0) if tensor.ndim == 3 else None
        if batch is None or batch.shape[-1] not in (1, 3, 4):
            raise DatasetConfigError(f"images: expected [batch, height, width, channels] with 1, 3 or 4 channels, "
                                     f"got a tensor of shape {tuple(tensor.shape)}")
        for picture in batch:
            array = _to_uint8(picture)
            out.append(np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3])
    if not out:
        raise DatasetConfigError("images: no image arrived (connect an IMAGE batch or list)")
    return out


def mask_arrays(masks, invert: bool = False) -> list[np.ndarray]:
    """MASK input(s): [B, H, W] batches or [H, W] masks in 0..1 (1 = the pixel counts fully in the loss) ->
    uint8 alpha [H, W] per mask. `invert` for masks that mark what to leave out (LoadImage's mask is 1 - alpha)."""
    out = []
    for tensor in _pieces(masks, "masks"):
        batch = tensor if tensor.ndim == 3 else tensor.unsqueeze(0) if tensor.ndim == 2 else None
        if batch is None:
            raise DatasetConfigError(f"masks: expected [batch, height, width], got a tensor of shape "
                                     f"{tuple(tensor.shape)}")
        for mask in batch:
            out.append(_to_uint8(1.0 - mask.float() if invert else mask))
    return out


def _joined(text: str) -> str:
    """One caption in one line: the core reads a caption file's first line only."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def caption_list(captions, count: int) -> list[str]:
    """Captions as STRING input(s) -> one per image ("" = none).

    - nothing, or only empty text: no captions (every image uses the class tokens);
    - one text: one line per image (blank lines = no caption for that image, trailing blank lines ignored); with
      a single image the whole text is its caption;
    - a list of texts (a list output, e.g. ComfyUI's text dataset loaders): one per image.
    One caption for several images is refused: that is what class_tokens is for."""
    texts = [t for t in _texts(captions)]
    if not any(t.strip() for t in texts):
        return [""] * count
    if len(texts) == 1:
        if count == 1:
            return [_joined(texts[0])]
        lines = texts[0].splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != count:
            hint = (" (for one caption on every image, use class_tokens and leave captions empty)"
                    if len(lines) == 1 else "")
            raise DatasetConfigError(f"captions: {len(lines)} caption line(s) for {count} images; give one line per "
                                     f"image, in the images' order{hint}")
        return [line.strip() for line in lines]
    if len(texts) != count:
        raise DatasetConfigError(f"captions: {len(texts)} captions for {count} images; give one caption per image, "
                                 "in the images' order")
    return [_joined(t) for t in texts]


def _texts(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _texts(item)]
    if not isinstance(value, str):
        raise DatasetConfigError(f"captions: expected text (STRING), got {type(value).__name__}")
    return [value]


def image_set(images, captions=None, masks=None, invert_mask: bool = False) -> ImageSet:
    """The node's inputs -> the ImageSet to write; counts and sizes are checked against each other."""
    pictures = image_arrays(images)
    alphas = mask_arrays(masks, invert_mask) if masks is not None else None
    if alphas is not None:
        if len(alphas) != len(pictures):
            raise DatasetConfigError(f"masks: {len(alphas)} masks for {len(pictures)} images; give one mask per "
                                     "image, in the images' order")
        for i, (picture, alpha) in enumerate(zip(pictures, alphas)):
            if alpha.shape != picture.shape[:2]:
                raise DatasetConfigError(
                    f"masks: mask {i + 1} is {alpha.shape[1]}x{alpha.shape[0]} but image {i + 1} is "
                    f"{picture.shape[1]}x{picture.shape[0]} (width x height); each mask must match its image (an "
                    "image without alpha gives LoadImage's 64x64 placeholder mask)")
    return ImageSet(tuple(pictures), None if alphas is None else tuple(alphas),
                    tuple(caption_list(captions, len(pictures))))


# ------------------------------------------------------------------------------------------ arrays -> folder

def write_image_set(image_set: ImageSet, root: str | Path) -> WrittenSet:
    """Write the set into `root/<fingerprint>/` (PNG, RGBA when masked, plus `<n>.txt` captions) unless a complete
    copy is there already."""
    fingerprint = image_set.fingerprint()
    folder = Path(root) / fingerprint[:_FOLDER_HASH_CHARS]
    names = _file_names(image_set)
    if _complete(folder, fingerprint, names):
        return WrittenSet(folder, fingerprint, reused=True)
    from ..trainer.atomic import atomic_path

    for i, image in enumerate(image_set.images):
        pixels = image if image_set.masks is None else np.dstack([image, image_set.masks[i]])
        _write_png(folder / f"{image_set.file_stem(i)}.png", pixels, atomic_path)
        if image_set.captions[i]:
            with atomic_path(folder / f"{image_set.file_stem(i)}{CAPTION_EXTENSION}") as tmp:
                tmp.write_bytes(image_set.captions[i].encode("utf-8"))
    manifest = json.dumps({"fingerprint": fingerprint, "files": names}, indent=1).encode("utf-8")
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_bytes(manifest)
    return WrittenSet(folder, fingerprint, reused=False)


def _write_png(path: Path, pixels: np.ndarray, atomic_path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(pixels, "RGBA" if pixels.shape[-1] == 4 else "RGB").save(tmp, format="PNG")


def _file_names(image_set: ImageSet) -> list[str]:
    names = []
    for i, caption in enumerate(image_set.captions):
        names.append(f"{image_set.file_stem(i)}.png")
        if caption:
            names.append(f"{image_set.file_stem(i)}{CAPTION_EXTENSION}")
    return names


def _complete(folder: Path, fingerprint: str, names: list[str]) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint
            and manifest.get("files") == names and all((folder / n).is_file() for n in names))


# ------------------------------------------------------------------------------------------ report

def summary_lines(image_set: ImageSet, written: WrittenSet) -> list[str]:
    """What the graph gave, for the node's report (the core's pre-flight report follows)."""
    sizes = Counter(f"{im.shape[1]}x{im.shape[0]}" for im in image_set.images)
    missing = sum(1 for c in image_set.captions if not c)
    lines = [f"images from the graph: {len(image_set.images)} ("
             + ", ".join(f"{n} x {size}" for size, n in sizes.most_common()) + ")",
             f"  captions: {len(image_set.captions) - missing} given, {missing} missing (class tokens)",
             "  masks: " + ("alpha masks (loss weights)" if image_set.masks is not None else "none"),
             f"  {'reused' if written.reused else 'written to'} {written.folder}"]
    return lines

"""Generated image folders for the dataset tests: every format and mode met in the wild, and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def save(image: Image.Image, path: Path, caption: str | None = None, caption_ext: str = ".txt", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    if caption is not None:
        path.with_suffix(caption_ext).write_text(caption + "\n", encoding="utf-8")
    return path


def rgb(path: Path, width: int, height: int, caption: str | None = "a photo", seed: int = 0, **kwargs) -> Path:
    return save(Image.fromarray(gradient(width, height, seed)), path, caption, **kwargs)


def exif_rotated_jpeg(path: Path, width: int, height: int, caption: str = "rotated") -> Path:
    """Stored width x height, displayed rotated by 90 degrees (EXIF orientation 6)."""
    image = Image.fromarray(gradient(width, height))
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(image, path, caption, exif=exif.tobytes())


def mixed_folder(folder: Path) -> dict[str, Path]:
    """One file of each kind; the broken ones are named broken_*."""
    f = {}
    f["rgb_png"] = rgb(folder / "rgb.png", 96, 64, "red, green, blue")
    f["jpeg"] = rgb(folder / "photo.JPG", 64, 96, "a jpeg")
    f["webp"] = rgb(folder / "web.webp", 80, 80, "a webp")
    f["bmp"] = rgb(folder / "bitmap.bmp", 64, 64, "a bitmap")
    rgba = np.dstack([gradient(64, 64), np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))])
    f["rgba"] = save(Image.fromarray(rgba, "RGBA"), folder / "alpha.png", "with alpha")
    palette = Image.fromarray(gradient(64, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    f["palette"] = save(palette, folder / "palette.png", "a palette image", transparency=0)
    f["grey"] = save(Image.fromarray(gradient(64, 64)[..., 0], "L"), folder / "grey.png", "grey")
    sixteen = (np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)
    f["sixteen"] = save(Image.fromarray(sixteen), folder / "sixteen.png", "16 bit")
    f["cmyk"] = save(Image.fromarray(gradient(64, 64)).convert("CMYK"), folder / "cmyk.jpg", "cmyk")
    f["rotated"] = exif_rotated_jpeg(folder / "rotated.jpg", 96, 64)
    f["no_caption"] = rgb(folder / "uncaptioned.png", 64, 64, caption=None)
    (folder / "notes.txt").write_text("not an image\n")
    # broken files
    (folder / "broken_empty.png").write_bytes(b"")
    (folder / "broken_empty.txt").write_text("caption of an empty file\n")
    (folder / "broken_noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.fromarray(gradient(128, 128)).save(buffer, "JPEG", quality=95)
    (folder / "broken_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "broken_text.png").write_text("this is text, not a png")
    for name in ("broken_empty", "broken_noise", "broken_truncated", "broken_text"):
        f[name] = next(folder.glob(name + ".*"))
    return f

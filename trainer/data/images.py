"""Reading the user's images: every format and mode met in the wild, EXIF rotation, a decompression-bomb guard,
and broken files reported (not crashed on). The user's folder is only read.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 16384 * 16384  # larger images are refused before decoding (decompression-bomb guard; Pillow's own
# limit, PIL.Image.MAX_IMAGE_PIXELS, by default refuses above about 179 million pixels first: see _open)
_INTERPOLATION = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,  # BOX is area averaging, like cv2's INTER_AREA
}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# What Pillow's decoders raise for a file that is damaged, truncated or odd (besides UnidentifiedImageError and the
# decompression-bomb guards, handled on their own): OSError ("image file is truncated", "broken data stream"),
# SyntaxError (a bad signature or header field), ValueError ("Decompressed data too large" from a PNG text chunk,
# an unknown mode), EOFError, struct.error and IndexError/KeyError/TypeError from short or inconsistent headers,
# zlib.error, ZeroDivisionError/OverflowError from zero or huge header fields, MemoryError from a header that claims
# a huge buffer. All mean "this file cannot be used": the image is skipped and listed.
PILLOW_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                      zlib.error, ZeroDivisionError, OverflowError, MemoryError)


class ImageProblem(Exception):
    """An image that cannot be used; the message says why (collected, then reported once)."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _claimed_size(path: Path) -> tuple[int, int] | None:
    """The width and height a file's header claims, read by the format's own plugin without the decompression-bomb
    check that `Image.open` adds (which raises before telling the size); None when no plugin reads the header."""
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for name in list(Image.ID):
                factory, accept = Image.OPEN[name]
                accepted = not accept or accept(prefix)  # as Image.open asks (a str is a reason for refusing)
                if not accepted or isinstance(accepted, str):
                    continue
                fp.seek(0)
                try:
                    return tuple(factory(fp, str(path)).size)
                except Exception:  # any plugin's complaint: try the next one
                    continue
    except Exception:  # only for the message: never a reason to fail
        pass
    return None


def _too_large(path: Path, over: str) -> ImageProblem:
    size = _claimed_size(path)
    claimed = f"{size[0]}x{size[1]} ({size[0] * size[1]:,} pixels)" if size else "its claimed size"
    return ImageProblem(f"{claimed} is over {over} (decompression-bomb guard)")


def _open(path: Path) -> Image.Image:
    """Opened lazily (header only). Too large: over our MAX_PIXELS, or over Pillow's own limit, which fires inside
    `Image.open` (DecompressionBombError above twice `Image.MAX_IMAGE_PIXELS`). Pillow's limit is read, never
    changed: it is process-wide and shared with the host (ComfyUI). Between once and twice that limit Pillow only
    warns (DecompressionBombWarning) and the image is used, our own limit deciding; where the process turns warnings
    into errors, the raised warning is a skip like the error."""
    if path.stat().st_size == 0:
        raise ImageProblem("empty file (0 bytes)")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageProblem("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise _too_large(path, f"Pillow's {2 * (Image.MAX_IMAGE_PIXELS or 0):,}-pixel limit") from None
    except Image.DecompressionBombWarning:
        raise _too_large(path, f"Pillow's {Image.MAX_IMAGE_PIXELS or 0:,}-pixel warning limit, and warnings are "
                               "errors in this process") from None
    except PILLOW_READ_ERRORS as e:
        raise ImageProblem(f"cannot be read ({_reason(e)})") from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise ImageProblem(f"{image.width}x{image.height} ({image.width * image.height:,} pixels) is over the "
                           f"{MAX_PIXELS:,}-pixel limit (decompression-bomb guard)")
    return image


def _reason(error: BaseException) -> str:
    """Pillow's message, with the error's class where the message alone would not say what happened."""
    text = str(error)
    return text if isinstance(error, OSError) and text else f"{type(error).__name__}: {text}"


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block is not a reason to drop the image
        return 1


def probe(path: Path) -> tuple[int, int]:
    """Displayed (width, height) after EXIF rotation, having decoded the file once to prove it is whole."""
    with _open(path) as image:
        width, height = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))  # decodes every block, 64x faster
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a plugin checking in load()
            raise ImageProblem(f"{e} (decompression-bomb guard)") from None
        except PILLOW_READ_ERRORS as e:
            raise ImageProblem(f"damaged or truncated ({_reason(e)})") from None
        if _orientation(image) in _ROTATED:
            width, height = height, width
    return width, height


def probe_all(paths: list[Path], workers: int = 8) -> tuple[dict[Path, tuple[int, int]], dict[Path, str]]:
    """Sizes of the usable images, and why each other one was skipped."""
    sizes, problems = {}, {}

    def one(path: Path):
        try:
            return path, probe(path), None
        except ImageProblem as e:
            return path, None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        for path, size, problem in pool.map(one, paths):
            if problem is None:
                sizes[path] = size
            else:
                problems[path] = problem
    return sizes, problems


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale ("I;16", "I", "F") scaled to 8 bits instead of clipped."""
    array = np.asarray(image)
    if image.mode == "F":
        peak = float(array.max()) or 1.0
        array = array / (255.0 if peak > 1.0 else 1.0 / 255.0)
    elif array.dtype != np.uint8:
        array = array.astype(np.float64) / (65535.0 / 255.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def load_rgb(path: Path, with_alpha: bool = False) -> np.ndarray:
    """[H, W, 3] uint8 RGB (or [H, W, 4] RGBA when `with_alpha`), upright per EXIF, from any mode."""
    with _open(path) as image:
        try:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                image = _to_8bit(image)
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            image = image.convert("RGBA" if with_alpha else "RGB")  # CMYK, L, LA, 1, RGBA ...
            return np.asarray(image, dtype=np.uint8).copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageProblem(f"{e} (decompression-bomb guard)") from None
        except PILLOW_READ_ERRORS as e:
            raise ImageProblem(f"damaged or truncated ({_reason(e)})") from None


def resize_and_crop(image: np.ndarray, resized: tuple[int, int], bucket: tuple[int, int],
                    interpolation: str | None = None, rng: random.Random | None = None) -> np.ndarray:
    """Resize to `resized` (w, h), then crop to `bucket`: centred, or at a random offset when `rng` is given.
    Default filter: area when shrinking both sides, else lanczos (sd-scripts' choice)."""
    height, width = image.shape[:2]
    if (width, height) != tuple(resized):
        if interpolation is None:
            interpolation = "area" if width >= resized[0] and height >= resized[1] else "lanczos"
        image = np.asarray(Image.fromarray(image).resize(tuple(resized), _INTERPOLATION[interpolation]))
    height, width = image.shape[:2]
    if width > bucket[0]:
        extra = width - bucket[0]
        left = rng.randint(0, extra) if rng else extra // 2
        image = image[:, left:left + bucket[0]]
    if height > bucket[1]:
        extra = height - bucket[1]
        top = rng.randint(0, extra) if rng else extra // 2
        image = image[top:top + bucket[1]]
    if image.shape[0] != bucket[1] or image.shape[1] != bucket[0]:
        raise ValueError(f"resized {tuple(resized)} does not cover the bucket {tuple(bucket)}")
    return np.ascontiguousarray(image)


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug: with probability 1/3, either a hue shift of up to ±8 (of 180) or a gamma of 0.95-1.05."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = np.asarray(Image.fromarray(image[..., :3]).convert("HSV")).copy()
        shift = rng.uniform(-8, 8) * 256 / 180  # PIL's hue runs 0-255
        hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + shift) % 256).astype(np.uint8)
        rgb = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    else:
        gamma = rng.uniform(0.95, 1.05)
        rgb = np.clip(image[..., :3].astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    out = image.copy()
    out[..., :3] = rgb
    return out


def to_tensor(image: np.ndarray):
    """[H, W, 3] uint8 -> [3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(image[..., :3].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


@dataclass(frozen=True)
class SkippedReport:
    problems: dict[Path, str]

    def message(self) -> str:
        lines = [f"  {path}: {why}" for path, why in sorted(self.problems.items())]
        return f"{len(self.problems)} image file(s) skipped:\n" + "\n".join(lines)

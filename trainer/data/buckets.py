"""Aspect-ratio buckets, as sd-scripts computes them.

Sizes are (width, height). With upscaling allowed, an image goes to the predefined bucket of nearest aspect ratio,
is scaled to cover it and centre-cropped (randomly with random_crop). With `bucket_no_upscale`, an image larger
than the resolution's area is scaled down to that area and any image keeps its own size floored to the step; the
bucket is whatever that gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]


def bucket_resolutions(resolution: Size, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[Size]:
    """Candidate buckets: every (w, h) with w from min to max in steps and h the largest stepped height keeping
    w·h within the resolution's area (and both orientations), plus the square; sorted. Min and max are first rounded
    to multiples of the step (min down, max up, as sd-scripts does), so every side is a multiple of the step."""
    min_size, max_size = max(step, min_size - min_size % step), -(-max_size // step) * step
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // step) * step
    sizes = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # the training size
    resized: Size  # the image is resized to this, then cropped to `bucket`
    aspect_error: float


class BucketPlanner:
    def __init__(self, resolution: Size, min_size: int = 256, max_size: int = 1024, step: int = 64,
                 no_upscale: bool = False, enabled: bool = True):
        self.resolution = resolution
        self.step = step
        self.no_upscale = no_upscale and enabled
        self.max_area = resolution[0] * resolution[1]
        if not enabled:
            self.predefined = [resolution]
        elif not no_upscale:
            self.predefined = bucket_resolutions(resolution, min_size, max_size, step)
        else:
            self.predefined = []
        self.predefined_set = set(self.predefined)
        self.aspects = [w / h for w, h in self.predefined]

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.step

    def choose(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            bucket = (width, height)
            if bucket not in self.predefined_set:
                errors = [abs(a - aspect) for a in self.aspects]
                bucket = self.predefined[errors.index(min(errors))]  # first of the nearest, in sorted order
            if aspect > bucket[0] / bucket[1]:  # wider than the bucket: match heights
                scale = bucket[1] / height
            else:
                scale = bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                w_rounded = self._round(rw)
                h_for_w = self._round(w_rounded / aspect)
                h_rounded = self._round(rh)
                w_for_h = self._round(h_rounded * aspect)
                if abs(w_rounded / h_for_w - aspect) < abs(w_for_h / h_rounded - aspect):
                    resized = (w_rounded, int(w_rounded / aspect + 0.5))
                else:
                    resized = (int(h_rounded * aspect + 0.5), h_rounded)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
            if bucket[0] == 0 or bucket[1] == 0:
                raise ValueError(f"a {width}x{height} image is smaller than one bucket step ({self.step} px)")
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)


def crop_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """sd-scripts' (left, top, right, bottom) bookkeeping for a centre-cropped image (stored in latent caches)."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = image_size[0] / image_size[1]
    if bucket_aspect > image_aspect:
        width, height = bucket[1] * image_aspect, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - width) // 2
    top = (bucket[1] - height) // 2
    return left, top, left + width, top + height

"""Bucket tables and per-image choices equal to sd-scripts' rule, derived here by brute force from its statement:
candidates are the square of the area plus, for each stepped width, the tallest stepped height within the area and
max size (both orientations); an image takes the candidate of nearest aspect ratio (first in sorted order on a
tie), is scaled to cover it (rounding half up) and centre-cropped."""

import math
import random

import pytest

from trainer.data.buckets import BucketPlanner, bucket_resolutions, crop_ltrb


def brute_force_table(resolution, lo, hi, step):
    area = resolution[0] * resolution[1]
    table = {(int(math.sqrt(area) // step) * step,) * 2}
    for w in range(lo, hi + 1, step):
        fitting = [h for h in range(step, hi + 1, step) if w * h <= area]
        if fitting and max(fitting) >= lo:
            table |= {(w, max(fitting)), (max(fitting), w)}
    return sorted(table)


@pytest.mark.parametrize("resolution,lo,hi,step", [((1024, 1024), 256, 1024, 64), ((768, 768), 256, 1536, 64),
                                                   ((512, 512), 256, 1024, 64), ((1024, 768), 320, 1280, 32)])
def test_bucket_table_follows_the_rule(resolution, lo, hi, step):
    assert bucket_resolutions(resolution, lo, hi, step) == brute_force_table(resolution, lo, hi, step)


def test_known_sizes_at_1024():
    table = bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert (1024, 1024) in table and (960, 1024) in table and (1024, 960) in table and (256, 1024) in table
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in table)


SIZES = [(1000, 1000), (1920, 1080), (1080, 1920), (800, 1200), (333, 777), (4000, 3000), (1024, 960), (512, 2048),
         (300, 300), (1500, 100)]


@pytest.mark.parametrize("resolution,lo,hi", [((1024, 1024), 256, 1024), ((768, 768), 256, 1536)])
def test_image_goes_to_nearest_aspect_and_is_scaled_to_cover(resolution, lo, hi):
    planner = BucketPlanner(resolution, lo, hi, 64)
    table = brute_force_table(resolution, lo, hi, 64)
    for w, h in SIZES:
        choice = planner.choose(w, h)
        if (w, h) in table:
            expected = (w, h)
        else:
            errors = [abs(bw / bh - w / h) for bw, bh in table]
            expected = table[errors.index(min(errors))]
        assert choice.bucket == expected, (w, h)
        scale = max(expected[0] / w, expected[1] / h)
        assert choice.resized == (int(w * scale + 0.5), int(h * scale + 0.5))
        assert choice.resized[0] >= expected[0] and choice.resized[1] >= expected[1]


def no_upscale_rule(w, h, area, step):
    """sd-scripts' rule, step by step: scale to the area keeping the aspect, round the width (or the height) to the
    step, keep the one whose aspect error is smaller, then floor both sides to the step."""
    def rnd(x):
        x = int(x + 0.5)
        return x - x % step

    aspect = w / h
    if w * h > area:
        rw = math.sqrt(area * aspect)
        rh = area / rw
        by_width = (rnd(rw), rnd(rnd(rw) / aspect))
        by_height = (rnd(rnd(rh) * aspect), rnd(rh))
        if abs(by_width[0] / by_width[1] - aspect) < abs(by_height[0] / by_height[1] - aspect):
            resized = (by_width[0], int(by_width[0] / aspect + 0.5))
        else:
            resized = (int(by_height[1] * aspect + 0.5), by_height[1])
    else:
        resized = (w, h)
    return (resized[0] - resized[0] % step, resized[1] - resized[1] % step), resized


def test_bucket_no_upscale_at_512():
    planner = BucketPlanner((512, 512), 256, 1024, 64, no_upscale=True)
    for w, h in SIZES:
        choice = planner.choose(w, h)
        assert (choice.bucket, choice.resized) == no_upscale_rule(w, h, 512 * 512, 64), (w, h)
    assert planner.choose(1920, 1080).bucket == (640, 384) and planner.choose(1920, 1080).resized == (683, 384)
    small = planner.choose(300, 200)
    assert small.resized == (300, 200) and small.bucket == (256, 192)  # own size floored to the step
    big = planner.choose(1920, 1080)
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.bucket[0] % 64 == 0 and big.bucket[1] % 64 == 0
    assert abs(big.resized[0] / big.resized[1] - 1920 / 1080) < 0.02
    assert big.resized[0] * big.resized[1] <= 512 * 512 * 1.05  # scaled down to about the area, not up
    with pytest.raises(ValueError, match="smaller than one bucket step"):
        planner.choose(40, 40)


def test_without_buckets_every_image_covers_the_resolution():
    planner = BucketPlanner((512, 768), enabled=False)
    for w, h in SIZES:
        choice = planner.choose(w, h)
        assert choice.bucket == (512, 768)
        assert choice.resized[0] >= 512 and choice.resized[1] >= 768


def test_centre_and_random_crops():
    import numpy as np

    from trainer.data.images import resize_and_crop

    image = np.arange(100 * 60 * 3, dtype=np.uint8).reshape(60, 100, 3)
    centre = resize_and_crop(image, (100, 60), (64, 48))
    assert np.array_equal(centre, image[6:54, 18:82])
    crops = {resize_and_crop(image, (100, 60), (64, 48), rng=random.Random(s))[0, 0, 0] for s in range(20)}
    assert len(crops) > 1
    assert crop_ltrb((1024, 512), (2000, 1000)) == (0, 0, 1024, 512)
    assert crop_ltrb((512, 512), (1000, 500)) == (0, 128.0, 512, 384.0)

"""What a toy picture shows, measured against the procedural pictures themselves: the mean pixel distance to the
nearest of many jittered pictures of a caption (its colours), and which shape's outline fits its foreground best
(its shape, wherever and however large it is drawn)."""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from . import shapes

ALL_SHAPES = (*shapes.KNOWN_SHAPES, shapes.NEW_SHAPE)
REFERENCES = 32  # jittered pictures per caption: enough places and sizes that one lies near any drawn shape


def pixels(picture) -> np.ndarray:
    """A PIL picture (or an array) as float32 [H, W, 3] on the 0-255 scale."""
    return np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture, dtype=np.float32)


def distance(a, b) -> float:
    """Mean absolute difference per pixel and channel, 0-255."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


@lru_cache(maxsize=256)
def _references(colour: str, shape: str, background: str, size: int) -> np.ndarray:
    return np.stack([pixels(shapes.named(colour, shape, background, seed, size)) for seed in range(REFERENCES)])


def nearest_distance(picture, colour: str, shape: str, background: str) -> float:
    """Distance from `picture` to the nearest jittered picture of this caption (of the picture's size)."""
    array = pixels(picture)
    refs = _references(colour, shape, background, array.shape[0])
    return float(np.abs(refs - array).mean(axis=(1, 2, 3)).min())


def foreground(picture, colour: str, background: str) -> np.ndarray:
    """[H, W] bool: the pixels nearer to the shape's colour than to the background's."""
    array = pixels(picture)
    to_shape = np.abs(array - np.float32(shapes.COLOURS[colour])).sum(axis=2)
    to_background = np.abs(array - np.float32(shapes.BACKGROUNDS[background])).sum(axis=2)
    return to_shape < to_background


def outline_mask(shape: str, cx: float, cy: float, area: float, size: int) -> np.ndarray:
    """[size, size] bool: `shape` centred on (cx, cy), scaled to cover `area` pixels (as the training pictures draw
    it: upright, never turned)."""
    unit = _unit_area(shape)
    r = math.sqrt(area / unit)
    image = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        pen.polygon(shapes.outline(shape, cx, cy, r), fill=255)
    return np.asarray(image) > 127


@lru_cache(maxsize=8)
def _unit_area(shape: str, r: float = 100.0) -> float:
    """The area of `shape` at circumradius 1, measured on a large drawing."""
    size = int(2 * r + 4)
    image = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(image)
    c = size / 2
    if shape == "circle":
        pen.ellipse((c - r, c - r, c + r, c + r), fill=255)
    else:
        pen.polygon(shapes.outline(shape, c, c, r), fill=255)
    return float((np.asarray(image) > 127).sum()) / r**2


def shape_fits(picture, colour: str, background: str) -> dict[str, float]:
    """Each shape (the known ones and the new one) -> how well it covers the picture's foreground (intersection over
    union, 0-1) when placed on the foreground's centre at the foreground's area: position and size do not count,
    only the outline."""
    mask = foreground(picture, colour, background)
    area = float(mask.sum())
    if area == 0:
        return {shape: 0.0 for shape in ALL_SHAPES}
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    fits = {}
    for shape in ALL_SHAPES:
        model = outline_mask(shape, cx, cy, area, mask.shape[0])
        fits[shape] = float((mask & model).sum() / (mask | model).sum())
    return fits


def drawn_shape(picture, colour: str, background: str) -> str:
    """The shape whose outline fits the picture's foreground best."""
    fits = shape_fits(picture, colour, background)
    return max(fits, key=fits.get)


def star_lead(picture, colour: str, background: str) -> float:
    """How much better a star's outline fits the picture than the best of the circle, square and triangle: positive
    where it draws the new shape, negative where it draws a known one."""
    fits = shape_fits(picture, colour, background)
    return fits[shapes.NEW_SHAPE] - max(fits[s] for s in shapes.KNOWN_SHAPES)


def nearest_colours(picture) -> tuple[str, str]:
    """The (colour, background) of the procedural picture, of any shape, nearest to `picture`."""
    candidates = itertools.product(shapes.COLOURS, ALL_SHAPES, shapes.BACKGROUNDS)
    colour, _, background = min(candidates, key=lambda c: nearest_distance(picture, *c))
    return colour, background


def nearest_caption(picture) -> tuple[str, str, str]:
    """(colour, shape, background): the nearest procedural picture's colours, and the best-fitting outline in them."""
    colour, background = nearest_colours(picture)
    return colour, drawn_shape(picture, colour, background), background

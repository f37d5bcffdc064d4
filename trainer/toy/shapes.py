"""Procedural pictures: coloured shapes on plain backgrounds, with captions that name them
("a red circle on a white background"). Every picture is a pure function of its arguments and a seed."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
KNOWN_SHAPES = ("circle", "square", "triangle")  # what the toy transformer was pretrained on
NEW_SHAPE = "star"  # what it never saw: the demo teaches it as "sks"
SIZE = 32


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def outline(shape: str, cx: float, cy: float, r: float, turn: float = 0.0) -> list[tuple[float, float]]:
    """The polygon of a square, triangle or five-pointed star of circumradius r around (cx, cy)."""
    corners = {"square": 4, "triangle": 3, "star": 10}[shape]
    start = -math.pi / 2 + turn + (math.pi / 4 if shape == "square" else 0.0)
    points = []
    for k in range(corners):
        radius = r * (0.42 if shape == "star" and k % 2 else 1.0)
        angle = start + 2 * math.pi * k / corners
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw(shape: str, rgb: tuple[int, int, int], background: tuple[int, int, int], seed: int = 0,
         size: int = SIZE, jitter: bool = True) -> Image.Image:
    """One picture; with `jitter`, the seed moves and resizes the shape a little (never off the picture)."""
    rng = random.Random(seed)
    r = size * (rng.uniform(0.26, 0.36) if jitter else 0.31)
    cx = size / 2 + (rng.uniform(-0.1, 0.1) * size if jitter else 0.0)
    cy = size / 2 + (rng.uniform(-0.1, 0.1) * size if jitter else 0.0)
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        pen.polygon(outline(shape, cx, cy, r * (1.15 if shape == "star" else 1.0)), fill=rgb)
    return image


def named(colour: str, shape: str, background: str, seed: int = 0, size: int = SIZE,
          jitter: bool = True) -> Image.Image:
    return draw(shape, COLOURS[colour], BACKGROUNDS[background], seed, size, jitter)


def pretraining_set(variants: int, seed: int = 0, size: int = SIZE) -> list[tuple[Image.Image, str]]:
    """Every colour x known shape x background, `variants` jittered pictures of each, with their captions."""
    out = []
    for colour in COLOURS:
        for shape in KNOWN_SHAPES:
            for background in BACKGROUNDS:
                for v in range(variants):
                    out.append((named(colour, shape, background, seed * 100_003 + len(out), size),
                                caption(colour, shape, background)))
    return out


def random_picture(rng: random.Random, size: int = SIZE) -> Image.Image:
    """Anything flat-coloured: random colours, and 1-3 circles or random polygons (convex or concave, 3-12
    corners). The autoencoder learns from these, so it can draw shapes the transformer never saw."""
    def colour() -> tuple[int, int, int]:
        return tuple(rng.randrange(256) for _ in range(3))

    image = Image.new("RGB", (size, size), colour())
    pen = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        cx, cy, r = rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size, rng.uniform(0.1, 0.4) * size
        if rng.random() < 0.25:
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour())
            continue
        corners = rng.randint(3, 12)
        turn = rng.uniform(0, 2 * math.pi)
        inner = rng.uniform(0.3, 1.0)
        points = [(cx + r * (inner if k % 2 else 1.0) * math.cos(turn + 2 * math.pi * k / corners),
                   cy + r * (inner if k % 2 else 1.0) * math.sin(turn + 2 * math.pi * k / corners))
                  for k in range(corners)]
        pen.polygon(points, fill=colour())
    return image

"""A labelled grid of images (the Label Grid node's picture): each cell is an image with its label on a strip above
it, cells in rows of `columns`, left to right. Pure Pillow, with Pillow's built-in font (nothing is downloaded)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from ..trainer.errors import ConfigError

PAD = 4  # pixels between cells and around the grid
BACKGROUND, TEXT = (255, 255, 255), (0, 0, 0)


def grid_shape(count: int, columns: int = 0) -> tuple[int, int]:
    """(rows, columns) for `count` cells; `columns` 0 = about square."""
    if count < 1:
        raise ConfigError("label grid: no images; expected at least one image (one per checkpoint and strength)")
    if columns < 0:
        raise ConfigError(f"columns: {columns} is negative; expected 0 (about square) or a number of columns")
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    return math.ceil(count / columns), columns


def cell_origin(index: int, columns: int, cell: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of cell `index` (row-major) in a grid of `cell`-sized (width, height) cells."""
    row, column = divmod(index, columns)
    return PAD + column * (cell[0] + PAD), PAD + row * (cell[1] + PAD)


def label_grid(images: list[Image.Image], labels: list[str], columns: int = 0) -> Image.Image:
    """The grid of `images`, each under its label (labels pair with images in order; a missing label is blank)."""
    rows, columns = grid_shape(len(images), columns)
    font = ImageFont.load_default()
    strip = _text_height(font, labels) + 2 * PAD
    widths = [im.width for im in images] + [_text_width(font, t) + 2 * PAD for t in labels[:len(images)]]
    cell = (max(widths), max(im.height for im in images) + strip)
    grid = Image.new("RGB", (PAD + columns * (cell[0] + PAD), PAD + rows * (cell[1] + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = cell_origin(i, columns, cell)
        if i < len(labels):
            draw.text((x + PAD, y + PAD), labels[i], fill=TEXT, font=font)
        grid.paste(image.convert("RGB"), (x + (cell[0] - image.width) // 2, y + strip))
    return grid


def _text_height(font, labels: list[str]) -> int:
    boxes = [font.getbbox(t or " ") for t in labels] or [font.getbbox(" ")]
    return max(b[3] for b in boxes)


def _text_width(font, text: str) -> int:
    return int(font.getlength(text))

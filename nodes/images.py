"""Pictures the train node outputs, drawn with PIL: the loss curve, and the newest previews as one batch."""

from __future__ import annotations

from PIL import Image, ImageDraw

BACKGROUND, GRID, RAW, AVERAGE, TEXT = (24, 24, 28), (60, 60, 68), (110, 140, 190), (255, 170, 60), (220, 220, 220)


def moving_average(values: list[float], window: int = 50) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(losses: list[float] | tuple[float, ...], width: int = 768, height: int = 384,
               first_step: int = 1) -> Image.Image:
    """Loss per step (thin) and its 50-step moving average (thick); constant or empty series draw too."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 16, height - 32
    for i in range(5):
        y = top + (bottom - top) * i / 4
        draw.line([(left, y), (right, y)], fill=GRID)
    values = [float(v) for v in losses if v == v]  # NaN would break the scale
    if not values:
        draw.text((left + 8, (top + bottom) // 2), "no steps yet", fill=TEXT)
        return image
    low, high = min(values), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5 * abs(low or 1), high + 0.5 * abs(high or 1)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(values) - 1, 1))
        return x, bottom - (bottom - top) * (v - low) / (high - low)

    if len(values) == 1:
        x, y = point(0, values[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=AVERAGE)
    else:
        draw.line([point(i, v) for i, v in enumerate(values)], fill=RAW, width=1)
        draw.line([point(i, v) for i, v in enumerate(moving_average(values))], fill=AVERAGE, width=3)
    draw.text((4, top - 6), f"{high:.4g}", fill=TEXT)
    draw.text((4, bottom - 6), f"{low:.4g}", fill=TEXT)
    draw.text((left, bottom + 8), f"step {first_step}", fill=TEXT)
    last = f"step {first_step + len(values) - 1}   loss {values[-1]:.4f}   avg {moving_average(values)[-1]:.4f}"
    draw.text((max(left, right - 7 * len(last)), bottom + 8), last, fill=TEXT)
    return image


def same_size(images: list[Image.Image]) -> list[Image.Image]:
    """RGB images at the first one's size (a batch IMAGE has one size)."""
    if not images:
        return []
    size = images[0].size
    return [im.convert("RGB") if im.size == size else im.convert("RGB").resize(size, Image.LANCZOS) for im in images]

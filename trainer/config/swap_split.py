"""sd-scripts' split of --blocks_to_swap N between FLUX.1's double and single blocks, written once: the memory of
N // 2 double and (N - N // 2) * 2 single blocks leaves the device, at most 17 of 19 and 36 of 38."""

from __future__ import annotations

MAX_SWAPPED_DOUBLE, MAX_SWAPPED_SINGLE = 17, 36
MAX_SWAPPED_BLOCKS = 35  # 17 double + 18 pairs of single blocks


def freed_blocks(blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks' worth of memory that --blocks_to_swap frees on the device."""
    if not 0 <= blocks_to_swap <= MAX_SWAPPED_BLOCKS:
        raise ValueError(f"blocks_to_swap: expected 0-{MAX_SWAPPED_BLOCKS}, not {blocks_to_swap}")
    return (min(blocks_to_swap // 2, MAX_SWAPPED_DOUBLE),
            min((blocks_to_swap - blocks_to_swap // 2) * 2, MAX_SWAPPED_SINGLE))

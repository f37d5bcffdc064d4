"""The toy picture measures judge the procedural pictures themselves right: every colour, shape and background at
places and sizes the references never had, and a shape's outline wherever and however large it is drawn."""

import itertools

import numpy as np
import pytest
from PIL import Image

from trainer.toy import measure, shapes


def test_every_procedural_picture_is_recognised_at_new_places_and_sizes():
    for colour, shape, background in itertools.product(shapes.COLOURS, measure.ALL_SHAPES, shapes.BACKGROUNDS):
        picture = shapes.named(colour, shape, background, seed=1000 + len(colour) + len(shape))  # not a reference
        assert measure.nearest_caption(picture) == (colour, shape, background)


@pytest.mark.parametrize("shape", measure.ALL_SHAPES)
def test_outline_fit_ignores_place_and_size(shape):
    """A shape drawn far off-centre and small, or large, is still that shape; a star leads only for a star."""
    for cx, cy, r in ((10.0, 12.0, 6.0), (17.0, 15.0, 13.0)):
        mask = measure.outline_mask(shape, cx, cy, 3.0 * r * r, 32)
        picture = Image.fromarray(np.where(mask[..., None], np.uint8(shapes.COLOURS["red"]),
                                           np.uint8(shapes.BACKGROUNDS["white"])))
        assert measure.drawn_shape(picture, "red", "white") == shape
        assert (measure.star_lead(picture, "red", "white") > 0) == (shape == shapes.NEW_SHAPE)


def test_a_picture_without_the_shapes_colour_fits_no_outline():
    blank = Image.new("RGB", (32, 32), shapes.BACKGROUNDS["white"])
    assert set(measure.shape_fits(blank, "red", "white").values()) == {0.0}
    assert measure.distance(blank, blank) == 0.0

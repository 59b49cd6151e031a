"""The pixel value and its one text form (marker names, map-marker keys)."""

import pytest

from hats_margin.pixel import Pixel, margin_key, parse_margin_key


@pytest.mark.parametrize("order, pixel", [(0, 0), (3, 767), (29, 12 * 4**29 - 1)])
def test_a_pixel_key_parses_back_to_the_same_pixel(order, pixel):
    p = Pixel(order, pixel)
    assert p.key == f"{order}_{pixel}"
    assert Pixel.parse(p.key) == p
    assert p == (order, pixel) and hash(p) == hash((order, pixel))  # interchangeable with the old tuples


@pytest.mark.parametrize("index", [None, 0, 2, 11])
def test_a_margin_key_names_its_margin_and_pixel(index):
    p = Pixel(5, 1234)
    key = margin_key(p, index)
    assert key == ("5_1234" if index is None else f"{index}:5_1234")
    assert parse_margin_key(key) == (index, p)


@pytest.mark.parametrize("bad", ["", "5", "5-12", "a_1", "1_2_3", "x:1_2"])
def test_text_that_is_not_a_pixel_key_is_refused(bad):
    with pytest.raises(ValueError):
        parse_margin_key(bad)


def test_a_pixel_cannot_be_changed():
    p = Pixel(1, 2)
    with pytest.raises(AttributeError):
        p.order = 3

"""A HEALPix pixel as a value, and its one text form.

``Pixel(order, pixel)`` is a named tuple: it compares, hashes and unpacks like the plain
``(order, pixel)`` tuples it replaces. Its text form ``order_pixel`` names the done markers and
keys the rows a map task sent; with several margins from one read those keys are
``margin_index:order_pixel``. Formatting and parsing live only here.
"""

from __future__ import annotations

from typing import NamedTuple


class Pixel(NamedTuple):
    """One HEALPix pixel: its order and its nested index at that order."""

    order: int
    pixel: int

    @property
    def key(self) -> str:
        """``order_pixel``: the pixel's name in marker files and map-marker keys."""
        return f"{self.order}_{self.pixel}"

    @classmethod
    def parse(cls, key: str) -> Pixel:
        """The pixel named ``order_pixel``; ValueError for any other text."""
        parts = key.split("_")
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(f"not an order_pixel key: {key!r}")
        return cls(int(parts[0]), int(parts[1]))


def margin_key(pixel: Pixel, margin_index: int | None = None) -> str:
    """``order_pixel`` for a single margin; ``margin_index:order_pixel`` with several."""
    return pixel.key if margin_index is None else f"{margin_index}:{pixel.key}"


def parse_margin_key(key: str) -> tuple[int | None, Pixel]:
    """(margin index or None, pixel) of a key written by :func:`margin_key`."""
    index, sep, rest = key.rpartition(":")
    return (int(index) if sep else None), Pixel.parse(rest)

"""The destination tiling of the verifier, computed from the primary's partitions alone:
partitions + negative tree as disjoint order-29 ranges, their bounding caps, and neighbour rings.

Nothing here comes from the pipeline's geometry (its independence is the verifier's value); the
negative tree is computed here too, with numpy (hats' numba version costs a ~6-15 s compile per
process; tests check both agree). HEALPix itself is cdshealpix, called through
``hats_margin.healpix`` (its compiled core, bit for bit ``cdshealpix.nested``, without astropy).
"""

from __future__ import annotations

import numpy as np

from hats_margin import healpix

MAX_ORDER = 29
MIN_CELL_WIDTH_ARCSEC = np.degrees(np.sqrt(4 * np.pi / (12 * 4.0 ** np.arange(MAX_ORDER + 1)))) * 3600.0 / 1.6
"""hats' ``order2mindist`` per order, in arcsec (written out: importing hats costs a second or
more of every verify; a test checks it against hats)."""
CAP_SAFETY = 1.001
"""Relative slack on bounding-cap radii and on the prune test (prunes are never near the threshold)."""
_RING_CHUNK = 50_000


def negative_tree(pixels: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The largest pixels covering exactly the sky outside ``pixels`` (disjoint ``(order, pixel)``),
    in nested order: the unique decomposition of the uncovered order-29 ranges into aligned cells
    (what hats' ``generate_negative_tree_pixels`` returns)."""
    orders = np.array([o for o, _ in pixels], dtype=np.int64)
    nums = np.array([p for _, p in pixels], dtype=np.int64)
    gap_lo = np.concatenate([[0], np.sort((nums + 1) << (2 * (MAX_ORDER - orders)))])
    gap_hi = np.concatenate([np.sort(nums << (2 * (MAX_ORDER - orders))), [12 << (2 * MAX_ORDER)]])
    keep = gap_hi > gap_lo
    gap_lo, gap_hi = gap_lo[keep], gap_hi[keep]
    found_orders, found_pixels = [], []
    for order in range(MAX_ORDER + 1):
        size = 1 << (2 * (MAX_ORDER - order))
        lo, hi = -(-gap_lo // size), gap_hi // size  # the cells of this order inside each gap
        if order == 0:
            inner_lo = inner_hi = lo
        else:  # ... less the children of parents already inside the gap
            parent = size << 2
            inner_lo, inner_hi = 4 * -(-gap_lo // parent), 4 * (gap_hi // parent)
            empty = inner_lo >= inner_hi
            inner_lo, inner_hi = np.where(empty, hi, inner_lo), np.where(empty, hi, inner_hi)
        for first, last in ((lo, np.minimum(hi, inner_lo)), (np.maximum(lo, inner_hi), hi)):
            counts = np.maximum(last - first, 0)
            if counts.any():
                found_pixels.append(np.repeat(first, counts) + ranks(counts))
                found_orders.append(np.full(int(counts.sum()), order, dtype=np.int64))
    if not found_orders:
        return []
    o, p = np.concatenate(found_orders), np.concatenate(found_pixels)
    sort = np.argsort(p << (2 * (MAX_ORDER - o)), kind="stable")
    return list(zip(o[sort].tolist(), p[sort].tolist()))


class Tiles:
    """Partitions + negative tree as disjoint order-29 ranges, sorted."""

    def __init__(self, pixels: list[tuple[int, int]]):
        """Sort the (order, pixel) pairs by range start; ``index`` maps each pair to its tile number."""
        orders = np.array([o for o, _ in pixels], dtype=np.int64)
        nums = np.array([p for _, p in pixels], dtype=np.int64)
        starts = nums << (2 * (MAX_ORDER - orders))
        sort = np.argsort(starts, kind="stable")
        self.orders, self.pixels, self.starts = orders[sort], nums[sort], starts[sort]
        self.ends = (self.pixels + 1) << (2 * (MAX_ORDER - self.orders))
        self.index = {(int(o), int(p)): i for i, (o, p) in enumerate(zip(self.orders, self.pixels))}
        self._centers = None
        self._radii = None

    def __len__(self):
        """Number of tiles."""
        return len(self.orders)

    def pixel(self, tile) -> tuple[int, int]:
        """(order, pixel) of tile number ``tile``."""
        return int(self.orders[tile]), int(self.pixels[tile])

    def check_cover(self) -> str | None:
        """None if the tiles cover the sphere exactly, without gap or overlap; else the problem."""
        full = 12 << (2 * MAX_ORDER)
        if (
            len(self) == 0
            or self.starts[0] != 0
            or self.ends[-1] != full
            or np.any(self.starts[1:] != self.ends[:-1])
        ):
            return "the primary's partitions and negative tree do not tile the sphere exactly"
        return None

    def containing(self, position29: np.ndarray) -> np.ndarray:
        """Tile number holding each order-29 index."""
        return np.searchsorted(self.starts, position29, side="right") - 1

    def overlapping(self, order: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (query index, tile index) of every tile overlapping each order-``order`` cell."""
        shift = 2 * (MAX_ORDER - order)
        lo = np.searchsorted(self.ends, cells << shift, side="right")
        hi = np.searchsorted(self.starts, (cells + 1) << shift, side="left")
        counts = hi - lo
        query = np.repeat(np.arange(len(cells), dtype=np.int64), counts)
        return query, np.repeat(lo, counts) + ranks(counts)

    def caps(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit vector of each tile's centre and a radius (rad) bounding its closed region."""
        if self._centers is None:
            centers = np.zeros((len(self), 3))
            radii = np.zeros(len(self))
            for order in np.unique(self.orders):
                sel = np.flatnonzero(self.orders == order)
                lon, lat = healpix.healpix_to_lonlat_deg(self.pixels[sel], int(order))
                center = unit(np.radians(lon), np.radians(lat))
                vlon, vlat = healpix.vertices_rad(self.pixels[sel], int(order), step=16)
                edge = unit(vlon, vlat)
                radius = angle(edge, center[:, None, :]).max(axis=1)
                centers[sel], radii[sel] = center, radius * CAP_SAFETY + 1e-12
            self._centers, self._radii = centers, radii
        return self._centers, self._radii


def ranks(counts: np.ndarray) -> np.ndarray:
    """0..n-1 within each run of a repeat(…, counts) expansion."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def unit(lon_rad, lat_rad) -> np.ndarray:
    """Unit vectors (..., 3) of the given longitudes and latitudes in radians."""
    cos_lat = np.cos(lat_rad)
    return np.stack([cos_lat * np.cos(lon_rad), cos_lat * np.sin(lon_rad), np.sin(lat_rad)], axis=-1)


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (rad) between unit vectors, atan2(|a x b|, a . b)."""
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    return np.arctan2(cross, np.sum(a * b, axis=-1))


def cell_order_for(threshold_arcsec: float) -> int | None:
    """The deepest order whose minimum cell width (hats ``order2mindist``) is >= the threshold,
    or None when even order-0 cells are narrower (then every destination is a candidate)."""
    for order in range(MAX_ORDER, -1, -1):
        if MIN_CELL_WIDTH_ARCSEC[order] >= threshold_arcsec:
            return order
    return None


def ring_tiles(tiles: Tiles, cells: np.ndarray, order: int, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique pairs (cell index, tile index): the tiles overlapping each cell's ``rings``-ring
    (the cell and every cell reached in ``rings`` neighbour steps; cdshealpix lists all the
    cells that touch a cell, 7 or 8 of them)."""
    owners, found = [], []
    n_tiles = len(tiles)
    for lo in range(0, len(cells), _RING_CHUNK):
        chunk = cells[lo : lo + _RING_CHUNK]
        ring = chunk[:, None]
        for _ in range(rings):
            nbrs = healpix.neighbours(ring.reshape(-1), order)
            ring = nbrs.reshape(len(chunk), -1)
            ring = np.where(ring < 0, chunk[:, None], ring)  # a missing neighbour: reuse the cell
        ring.sort(axis=1)
        keep = np.ones(ring.shape, dtype=bool)
        keep[:, 1:] = ring[:, 1:] != ring[:, :-1]
        owner = np.nonzero(keep)[0] + lo
        query, tile = tiles.overlapping(order, ring[keep])
        key = np.unique(owner[query] * n_tiles + tile)
        owners.append(key // n_tiles)
        found.append(key % n_tiles)
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(owners), np.concatenate(found)

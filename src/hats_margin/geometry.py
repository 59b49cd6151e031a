"""Pure HEALPix bookkeeping for the candidate search: orders, reaches, nested bits, tilings.

No I/O, no Dask: numpy and cdshealpix only. Units are in the names (``*_arcsec``,
``*_deg``); orders are HEALPix depths, pixels are nested indices.

The candidate search is the heart of the map stage. For a source partition ``S`` and a
search order ``q`` (>= S's order), every row falls in one order-``q`` cell ``c`` (a bit
shift of its spatial index). A point within ``rings * ring_reach_arcsec(q)`` of ``c``
lies in ``c`` or in one of its ``rings``-step neighbours, so the destinations a row can
reach are the destination pixels overlapping that neighbourhood. Cells whose whole
neighbourhood stays inside ``S`` (decided from the nested index bits, no trigonometry)
contribute nothing and are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hats_margin import healpix

MAX_ORDER = 29
"""The deepest HEALPix order (spatial indices are order-29 nested indices): the one home of this
constant for the pipeline (the verifier keeps its own on purpose, see verify/tiles.py)."""

# hats' order2mindist is the 1.6-ratio estimate of the narrowest cell width; the true
# narrowest width (cds-healpix SMALLER_EDGE2OPEDGE_DIST) is 1.077x to 1.315x larger.
# We keep a further 2% of safety on top; tests re-measure the claim numerically.
RING_SAFETY = 0.98


# hats' order2mindist (arcsec) for every order: mean cell size sqrt(4 pi / npix) / 1.6. Written
# out here so that worker processes need not import hats (seconds of start-up per worker);
# a test checks it against hats.
_MINDIST_ARCSEC = np.degrees(np.sqrt(4 * np.pi / (12 * 4.0 ** np.arange(MAX_ORDER + 1)))) * 3600.0 / 1.6


def ring_reach_arcsec(order: int) -> float:
    """Distance (arcsec) that one ring of order-``order`` neighbours is guaranteed to cover.

    Every point whose great-circle distance to a cell ``c`` is at most this value lies in
    ``c`` or in one of its (up to 8) neighbours.
    """
    return float(_MINDIST_ARCSEC[int(order)]) * RING_SAFETY


def coarse_order_for_threshold(threshold_arcsec: float) -> int:
    """The importer's default margin order: the largest order whose estimated minimum
    cell width (hats ``order2mindist``) is at least the threshold, clipped to 0..MAX_ORDER."""
    fits = np.flatnonzero(_MINDIST_ARCSEC >= threshold_arcsec)
    return int(fits[-1]) if len(fits) else 0


def coarse_reach_arcsec(order: int) -> float:
    """What a coarse margin at ``order`` guarantees (hats ``order2mindist``, arcsec)."""
    return float(_MINDIST_ARCSEC[int(order)])


WHOLE_SKY_ARCSEC = 180.0 * 3600.0
"""No two points of the sphere are farther apart: a threshold this large is the whole sky."""


def whole_sky_rings(order: int) -> int:
    """Neighbour rings at ``order`` that surely cover the whole sky from any cell."""
    return math.ceil(WHOLE_SKY_ARCSEC / ring_reach_arcsec(order))


def one_ring_order(threshold_arcsec: float) -> int:
    """The deepest order at which one ring of neighbours covers the threshold
    (``ring_reach_arcsec(order) >= threshold``), clipped to 0..MAX_ORDER: the cheapest exact
    candidate search (two rings cost about 2.5x one in the search, for half the candidates)."""
    return coarse_order_for_threshold(threshold_arcsec / RING_SAFETY)


def rings_needed(threshold_arcsec: float, order: int) -> int:
    """How many neighbour rings at ``order`` surely cover ``threshold_arcsec`` (never more than
    the whole sky needs: a huge threshold costs no more than 180 degrees)."""
    if threshold_arcsec >= WHOLE_SKY_ARCSEC:
        return whole_sky_rings(order)
    return max(1, min(math.ceil(threshold_arcsec / ring_reach_arcsec(order)), whole_sky_rings(order)))


def covers_whole_sky(rings: int, order: int) -> bool:
    """Does a ``rings``-step neighbourhood at ``order`` surely hold every cell of the sky?"""
    return rings >= whole_sky_rings(order)


def nested_range_at(order: int, pixel, to_order: int = MAX_ORDER):
    """Half-open range [start, end) of the order-``to_order`` descendants of ``pixel``."""
    shift = 2 * (to_order - order)
    pixel = np.asarray(pixel, dtype=np.int64)
    return pixel << shift, (pixel + 1) << shift


def compact_even_bits(x: np.ndarray) -> np.ndarray:
    """Keep the even bits of each uint64 and pack them together (Morton decode: a nested
    index within its base face -> i, and of ``x >> 1`` -> j)."""
    x = x & np.uint64(0x5555555555555555)
    x = (x | (x >> np.uint64(1))) & np.uint64(0x3333333333333333)
    x = (x | (x >> np.uint64(2))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    return x


def local_xy(cells: np.ndarray, cell_order: int, parent_order: int, parent_pixel: int):
    """Integer coordinates (i, j) of order-``cell_order`` cells inside their
    order-``parent_order`` ancestor ``parent_pixel`` (nested bit de-interleave)."""
    depth = cell_order - parent_order
    sub = (np.asarray(cells, dtype=np.int64) - (np.int64(parent_pixel) << (2 * depth))).astype(np.uint64)
    return compact_even_bits(sub).astype(np.int64), compact_even_bits(sub >> np.uint64(1)).astype(np.int64)


def border_cell_mask(cells, cell_order: int, parent_order: int, parent_pixel: int, rings: int) -> np.ndarray:
    """True for cells whose ``rings``-step neighbourhood leaves their ancestor pixel.

    Within one base face, nested neighbours are the 8-connected (i, j) cells, so a cell at
    least ``rings`` cells away from every side of the ancestor's square keeps its whole
    neighbourhood inside it.
    """
    depth = cell_order - parent_order
    side = 1 << depth
    if side <= 2 * rings:
        return np.ones(len(cells), dtype=bool)
    if rings == 1:  # on a side <=> all of i's (even) or j's (odd) bits are 0, or all are 1: no decoding
        sub = np.asarray(cells, dtype=np.int64) - (np.int64(parent_pixel) << (2 * depth))
        even = np.int64(0x5555555555555555 & ((1 << (2 * depth)) - 1))
        i_bits, j_bits = sub & even, sub & (even << 1)
        return (i_bits == 0) | (i_bits == even) | (j_bits == 0) | (j_bits == (even << 1))
    i, j = local_xy(cells, cell_order, parent_order, parent_pixel)
    return (i < rings) | (j < rings) | (i >= side - rings) | (j >= side - rings)


def neighbourhood(cells: np.ndarray, order: int, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells within ``rings`` neighbour steps of each cell, itself included.

    Returns ``(owner, cell)`` pairs: ``owner`` indexes ``cells``. Pairs are unique.
    """
    cells = np.asarray(cells, dtype=np.int64)
    owner = np.arange(len(cells), dtype=np.int64)
    frontier_owner, frontier = owner, cells
    all_owner, all_cell = [owner], [cells]
    for _ in range(rings):
        if len(frontier) == 0:
            break
        nbrs = healpix.neighbours(frontier, order)
        rep_owner = np.repeat(frontier_owner, nbrs.shape[1])
        flat = nbrs.reshape(-1).astype(np.int64)
        keep = flat >= 0
        if rings == 1:  # cdshealpix lists a cell and its neighbours once each: no duplicates
            return rep_owner[keep], flat[keep]
        new_owner, new_cell = _unique_pairs(rep_owner[keep], flat[keep])
        all_owner.append(new_owner)
        all_cell.append(new_cell)
        frontier_owner, frontier = new_owner, new_cell
    return _unique_pairs(np.concatenate(all_owner), np.concatenate(all_cell))


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (a, b) pairs, sorted by a then b."""
    if len(a) == 0:
        return a, b
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True)
class Tiling:
    """A sorted set of disjoint HEALPix pixels (e.g. partitions + negative tree).

    ``orders``/``pixels`` are sorted by their order-29 range start, so overlap queries are
    two binary searches.
    """

    orders: np.ndarray
    pixels: np.ndarray

    @classmethod
    def from_pixels(cls, orders, pixels) -> Tiling:
        """A tiling of the given pixels (any order mix, must be disjoint), sorted by range start."""
        orders = np.asarray(orders, dtype=np.int64)
        pixels = np.asarray(pixels, dtype=np.int64)
        starts = pixels << (2 * (MAX_ORDER - orders))
        order_idx = np.argsort(starts, kind="stable")
        return cls(orders[order_idx], pixels[order_idx])

    def __len__(self) -> int:
        """Number of tiles."""
        return len(self.orders)

    @property
    def starts(self) -> np.ndarray:
        """First order-29 index of each tile."""
        return self.pixels << (2 * (MAX_ORDER - self.orders))

    @property
    def ends(self) -> np.ndarray:
        """One past the last order-29 index of each tile."""
        return (self.pixels + 1) << (2 * (MAX_ORDER - self.orders))

    def overlapping(self, query_order: int, query_cells) -> tuple[np.ndarray, np.ndarray]:
        """Pairs ``(query_index, tile_index)`` for every tile overlapping each query cell."""
        q_start, q_end = nested_range_at(query_order, query_cells)
        lo = np.searchsorted(self.ends, q_start, side="right")
        hi = np.searchsorted(self.starts, q_end, side="left")
        counts = np.maximum(hi - lo, 0)
        query_index = np.repeat(np.arange(len(q_start), dtype=np.int64), counts)
        offsets = np.arange(counts.sum(), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        return query_index, np.repeat(lo, counts) + offsets

    def index_of(self, order: int, pixel: int) -> int:
        """Index of an exact tile, or -1."""
        start = int(pixel) << (2 * (MAX_ORDER - int(order)))
        idx = int(np.searchsorted(self.starts, start))
        if idx < len(self) and self.orders[idx] == order and self.pixels[idx] == pixel:
            return idx
        return -1


def candidate_pairs(
    spatial_index: np.ndarray,
    index_order: int,
    source_order: int,
    source_pixel: int,
    search_order: int,
    rings: int,
    destinations: Tiling,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one source partition that may belong to the margin of each destination.

    Returns ``(row_index, destination_index)`` sorted by destination then row. The source
    pixel itself must not be in ``destinations``. Complete: every row within
    ``rings * ring_reach_arcsec(search_order)`` of a destination is paired with it.
    """
    empty = np.zeros(0, dtype=np.int64)
    if len(spatial_index) == 0 or len(destinations) == 0:
        return empty, empty
    search_order = max(search_order, source_order)
    if covers_whole_sky(rings, search_order):  # every row may reach every destination
        n_rows, n_dests = len(spatial_index), len(destinations)
        return np.tile(np.arange(n_rows, dtype=np.int64), n_dests), np.repeat(np.arange(n_dests, dtype=np.int64), n_rows)
    cells = np.asarray(spatial_index, dtype=np.int64) >> (2 * (index_order - search_order))
    # the border test per row (bit arithmetic, O(rows)); everything after it only touches the
    # rows of border cells, a small fraction of a partition (no sort or unique over all rows)
    rows = np.flatnonzero(border_cell_mask(cells, search_order, source_order, source_pixel, rings))
    if len(rows) == 0:
        return empty, empty
    border_cells, row_cell = np.unique(cells[rows], return_inverse=True)
    owner, nbr = neighbourhood(border_cells, search_order, rings)
    nbr_idx, dest_idx = destinations.overlapping(search_order, nbr)
    cell_dest = np.unique(np.stack([owner[nbr_idx], dest_idx], axis=1), axis=0)  # sorted by cell
    if len(cell_dest) == 0:
        return empty, empty
    # every (row, destination) of the row's cell
    pair_lo = np.searchsorted(cell_dest[:, 0], np.arange(len(border_cells)), side="left")
    pair_hi = np.searchsorted(cell_dest[:, 0], np.arange(len(border_cells)), side="right")
    per_row = (pair_hi - pair_lo)[row_cell]
    out_rows = np.repeat(rows, per_row)
    first = np.repeat(pair_lo[row_cell], per_row)
    offsets = np.arange(per_row.sum(), dtype=np.int64) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    dests = cell_dest[first + offsets, 1]
    by_dest = np.lexsort((out_rows, dests))
    return out_rows[by_dest], dests[by_dest]


def negative_tree(orders, pixels) -> tuple[np.ndarray, np.ndarray]:
    """The fewest pixels covering the sky not covered by the given disjoint pixels.

    Equivalent to hats' ``generate_negative_tree_pixels`` (the leaves of the 12 base pixels
    aligned with the catalog tree that hold no catalog pixel) without its JIT start-up cost.
    Returns ``(orders, pixels)`` sorted by position.
    """
    tiling = Tiling.from_pixels(orders, pixels)
    sky_end = 12 << (2 * MAX_ORDER)
    gap_starts = np.concatenate([[0], tiling.ends])
    gap_ends = np.concatenate([tiling.starts, [sky_end]])
    out_orders, out_pixels = [], []
    for start, end in zip(gap_starts.tolist(), gap_ends.tolist()):
        while start < end:
            # the largest aligned block that starts at `start` and fits before `end`
            level = min(MAX_ORDER, ((start & -start).bit_length() - 1) // 2 if start else MAX_ORDER)
            while (1 << (2 * level)) > end - start:
                level -= 1
            order = MAX_ORDER - level
            out_orders.append(order)
            out_pixels.append(start >> (2 * level))
            start += 1 << (2 * level)
    return np.asarray(out_orders, dtype=np.int64), np.asarray(out_pixels, dtype=np.int64)


def sincos_deg(angle_deg):
    """sin and cos of angles in degrees, reducing exactly by quadrants before converting
    (so multiples of 90 deg give exact 0 and +-1)."""
    angle_deg = np.asarray(angle_deg, dtype=np.float64)
    q = np.rint(angle_deg * (1.0 / 90.0))
    r = np.deg2rad(angle_deg - 90.0 * q)  # a - 90 q is exact (Sterbenz); |r| <= ~pi/4
    s = np.sin(r)
    c = np.cos(r)
    k = np.fmod(np.where(np.isfinite(q), q, 0.0), 4.0).astype(np.int64) & 3  # quadrant
    swap = (k & 1).astype(bool)
    sin_out = np.where(swap, c, s)
    cos_out = np.where(swap, s, c)
    sin_sign = 1 - 2 * (k >> 1)
    cos_sign = 1 - 2 * ((k ^ (k >> 1)) & 1)
    return sin_out * sin_sign, cos_out * cos_sign


def unit_vectors(ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(x, y, z)`` of (ra, dec) in degrees, as three arrays."""
    sr, cr = sincos_deg(ra_deg)
    sd, cd = sincos_deg(dec_deg)
    return cd * cr, cd * sr, sd

"""The exact margin test of the map stage: which candidate (row, destination) pairs are within
the threshold. Pure geometry (numpy + cdshealpix through pixel_distance): no I/O, no Dask.

Rows are decided a whole nested cell at a time where the threshold is far from the cell, and
one by one near it, when rows are dense enough to share cells. Distance to a region is
1-Lipschitz, so every point of a cell with centre ``c`` and certified radius ``r``
(``pixel_distance.cell_caps``) is within ``d(c) +- r`` of the destination: cells whose certified
distance bracket ``[lo, hi]`` (``pixel_distance.distance_bounds_to_pixels_arcsec``) has
``hi + r <= threshold`` are all in, cells with ``lo - r > threshold`` all out; the rows of the
cells in between are tested one by one. Every bound used is certified, so the result is the one
``within_threshold_of_pixel`` gives row by row (see its docstring for the exactness guarantee).
The rows tested one by one are tested against all their destinations in one call
(``pixel_distance.within_thresholds_of_pixels``): a call per destination cost a fixed ~0.5 ms,
most of the test where a row group has a few candidates for each of many destinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hats_margin.geometry import Tiling, coarse_order_for_threshold
from hats_margin.pixel_distance import (
    cell_caps,
    distance_bounds_to_pixels_arcsec,
    within_thresholds_of_pixels,
)

ROWS_PER_CELL = 4
"""Decide by cells only when the rows share cells at least this much on average (else the
per-cell work costs more than it saves: on a 1 M-row sky at 3600 arcsec, 2x more)."""


def pairs_within_threshold(
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    spatial_index: np.ndarray,
    index_order: int,
    min_cell_order: int,
    rows: np.ndarray,
    dest_idx: np.ndarray,
    destinations: Tiling,
    threshold_arcsec: float,
) -> np.ndarray:
    """Mask over the candidate pairs ``(rows[k], dest_idx[k])``: row within the threshold of
    the destination pixel.

    ``ra_deg``, ``dec_deg`` and ``spatial_index`` (nested, at ``index_order``) are per row of the
    row group; ``rows`` index them, ``dest_idx`` indexes ``destinations`` and is sorted (as
    ``geometry.candidate_pairs`` returns it). No row may lie in its destination (candidate
    pairs never do), and cells are taken no coarser than ``min_cell_order`` (at least the
    source partition's order, so that every cell lies outside every destination).
    """
    return pairs_within_thresholds(
        ra_deg, dec_deg, spatial_index, index_order, min_cell_order, rows, dest_idx, destinations,
        [threshold_arcsec],
    )[0]


def pairs_within_thresholds(
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    spatial_index: np.ndarray,
    index_order: int,
    min_cell_order: int,
    rows: np.ndarray,
    dest_idx: np.ndarray,
    destinations: Tiling,
    thresholds_arcsec,
) -> np.ndarray:
    """``pairs_within_threshold`` for several thresholds in one pass: a boolean array of shape
    ``(len(thresholds_arcsec), len(rows))``, row k the mask for ``thresholds_arcsec[k]``.

    The cells (at the order the largest threshold asks for) and their distances are computed
    once for every threshold; the rows a cell leaves undecided for some threshold are tested one
    by one, for all thresholds and destinations in one ``within_thresholds_of_pixels`` call (a
    cell's decision stands for the thresholds it decides). With one threshold this is
    ``pairs_within_threshold``.
    """
    part = CandidatePairs(ra_deg, dec_deg, spatial_index, index_order, min_cell_order, rows, dest_idx, destinations)
    return pairs_within_thresholds_of_parts([part], thresholds_arcsec)[0]


@dataclass(frozen=True)
class CandidatePairs:
    """The arguments of :func:`pairs_within_thresholds` but the thresholds: one row group's
    candidate pairs (``rows[k]``, ``dest_idx[k]``) and what deciding them needs."""

    ra_deg: np.ndarray
    dec_deg: np.ndarray
    spatial_index: np.ndarray
    index_order: int
    min_cell_order: int
    rows: np.ndarray
    dest_idx: np.ndarray
    destinations: Tiling


def pairs_within_thresholds_of_parts(parts: list[CandidatePairs], thresholds_arcsec) -> list[np.ndarray]:
    """:func:`pairs_within_thresholds` of each part (row groups of any partitions, each with its
    own destinations), the same mask for each as a call of its own: the cells are decided part by
    part, and the rows they leave, of every part, are tested in one ``within_thresholds_of_pixels``
    call, whose decision for a point depends on that point and its pixel alone. One call per row
    group cost a fixed ~0.5 ms of numpy calls, most of the exact test of a catalog of many small
    partitions (a few candidates each)."""
    thresholds = np.array(thresholds_arcsec, dtype=np.float64).ravel()
    decided = [_decide_by_cells(part, thresholds) for part in parts]
    ra, dec, dest, orders, pixels = [], [], [], [], []
    offset = 0
    for part, (_, _, active) in zip(parts, decided):
        sel = part.rows[active]
        ra.append(part.ra_deg[sel])
        dec.append(part.dec_deg[sel])
        dest.append(part.dest_idx[active] + offset)
        orders.append(part.destinations.orders)
        pixels.append(part.destinations.pixels)
        offset += len(part.destinations)
    counts = [len(a) for a in ra]
    if thresholds.size == 0 or sum(counts) == 0:
        return [keep for keep, _, _ in decided]
    within = within_thresholds_of_pixels(
        np.concatenate(ra), np.concatenate(dec), np.concatenate(dest), np.concatenate(orders),
        np.concatenate(pixels), thresholds,
    )
    out = []
    for (keep, cell_decided, active), lo, hi in zip(decided, np.cumsum([0, *counts[:-1]]), np.cumsum(counts)):
        if cell_decided is None:
            keep[:, active] = within[:, lo:hi]
        else:  # a cell's decision stands for the thresholds it decided
            keep[:, active] = np.where(cell_decided[:, active], keep[:, active], within[:, lo:hi])
        out.append(keep)
    return out


def _decide_by_cells(part: CandidatePairs, thresholds: np.ndarray):
    """``(keep, cell_decided, active)`` of one part: the pairs its whole cells put in (per
    threshold), which pairs a cell decided (None where rows are too sparse to share cells), and
    the pairs left to test one by one."""
    rows, dest_idx, destinations = part.rows, part.dest_idx, part.destinations
    keep = np.zeros((thresholds.size, len(rows)), dtype=bool)
    if thresholds.size == 0:
        return keep, None, np.zeros(0, dtype=np.intp)
    spatial_index = np.asarray(part.spatial_index, dtype=np.int64)
    index_order = part.index_order
    active = np.arange(len(rows))
    # cells whose radius is about a twentieth of the threshold: nearly all are decided whole
    order = min(index_order, max(part.min_cell_order, coarse_order_for_threshold(float(thresholds.max()) / 16)))
    cells = spatial_index[rows] >> (2 * (index_order - order))
    # unique (destination, cell) pairs (pairs are sorted by destination)
    by_pair = np.lexsort((cells, dest_idx))
    c_sorted, d_sorted = cells[by_pair], dest_idx[by_pair]
    new_pair = np.ones(len(rows), dtype=bool)
    new_pair[1:] = (c_sorted[1:] != c_sorted[:-1]) | (d_sorted[1:] != d_sorted[:-1])
    if int(new_pair.sum()) * ROWS_PER_CELL > len(rows):
        return keep, None, active
    group = np.empty(len(rows), dtype=np.int64)
    group[by_pair] = np.cumsum(new_pair) - 1
    pair_cell, pair_dest = c_sorted[new_pair], d_sorted[new_pair]
    unique_cells, cell_of_pair = np.unique(pair_cell, return_inverse=True)
    c_ra, c_dec, c_radius = cell_caps(unique_cells, order)  # one call for every destination
    # a certified bracket of each centre's distance, about a 500th of the largest threshold
    # wide, is all a cell's decision needs (an exact distance cost ~30x more per centre)
    dist_lo, dist_hi = distance_bounds_to_pixels_arcsec(
        c_ra[cell_of_pair], c_dec[cell_of_pair], pair_dest, destinations.orders, destinations.pixels,
        float(thresholds.max()) / 16,
    )
    radius = c_radius[cell_of_pair]
    # the bracket is certified to 1e-9 arcsec + 1e-9 * distance
    tol = 2e-9 + 2e-9 * (dist_hi + radius)
    thr = thresholds[:, None]
    all_in = (dist_hi + radius <= thr - tol)[:, group]
    all_out = (dist_lo - radius > thr + tol)[:, group]
    keep |= all_in
    cell_decided = all_in | all_out
    return keep, cell_decided, np.flatnonzero(~cell_decided.all(axis=0))

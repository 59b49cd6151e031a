"""The verifier's own candidate search: which destination pixels each primary row may belong to.

Independent of the pipeline's search (no ``geometry`` helpers, no planning code, no margin
order): candidate cells come from the rows' ``(ra, dec)`` (not their spatial index) at an order
``c`` chosen from the threshold alone (the deepest with ``order2mindist(c) >= threshold``); a
row is paired with every destination overlapping the **2-ring** of its order-``c`` cell, twice
the reach the threshold needs. Rows whose order-``j`` cell (``j < c``) has its 1-ring inside
their partition are skipped first (the 2-ring of a cell lies in the 1-ring of its parent).
Above ``order2mindist(0)`` every destination whose bounding cap comes within the threshold is a
candidate. Candidates are then pruned or accepted with a bounding-cap test (distance to the
pixel's centre, certified circumradius), and the rest decided by
:func:`hats_margin.pixel_distance.within_threshold_of_pixel` (certified to 1e-9 relative).

Every function takes the verification's context ``ctx`` (see ``checker.Context``).
"""

from __future__ import annotations

import math

import numpy as np

from hats_margin import healpix
from hats_margin.pixel_distance import distance_to_pixel_arcsec, within_threshold_of_pixel
from hats_margin.verify.tiles import CAP_SAFETY, MAX_ORDER, angle, ranks, ring_tiles, unit

RING_STEPS = 2
"""Neighbour rings around a row's order-``c`` cell: one ring already reaches ``order2mindist(c)``
(>= the threshold), two give a 2x safety factor."""
PRUNE_STEP = 3
"""Levels between two interior-pruning passes of the candidate search."""
ARCSEC_PER_RAD = 180.0 * 3600.0 / math.pi


def distance_arcsec(ra_deg: np.ndarray, dec_deg: np.ndarray, order: int, pixel: int) -> np.ndarray:
    """Distance (arcsec) of each point (degrees) to pixel (order, pixel); 0 inside it, NaN for non-finite points."""
    return np.asarray(distance_to_pixel_arcsec(ra_deg, dec_deg, int(order), int(pixel)), dtype=np.float64)


def within(ra_deg: np.ndarray, dec_deg: np.ndarray, order: int, pixel: int, threshold_arcsec: float) -> np.ndarray:
    """Whether each point (degrees) is within ``threshold_arcsec`` of pixel (order, pixel)."""
    return np.asarray(
        within_threshold_of_pixel(ra_deg, dec_deg, int(order), int(pixel), threshold_arcsec), dtype=bool
    )


def sources_reaching(ctx, in_batch: np.ndarray) -> list[int]:
    """The source tiles (primary partitions) that can reach a tile of the batch: those whose cell
    at the search order (or their own order, if coarser) has a 2-ring touching one; every source
    when the batch is every tile or the threshold is wider than order-0 cells."""
    if in_batch.all():
        return ctx.sources
    tiles, reach = ctx.tiles, []
    if ctx.cell_order is None:
        return ctx.sources
    for source in ctx.sources:
        order = int(tiles.orders[source])
        level = min(ctx.cell_order, order)
        cell = np.array([int(tiles.pixels[source]) >> (2 * (order - level))], dtype=np.int64)
        _, found = ring_tiles(tiles, cell, level, RING_STEPS)
        if in_batch[found].any():
            reach.append(source)
    return reach



def candidates(ctx, ra, dec, own, source, in_batch, warn) -> tuple[np.ndarray, np.ndarray]:
    """(row, tile) pairs that may satisfy the contract, tile != the row's own tile, tile in batch."""
    tiles = ctx.tiles
    c = ctx.cell_order
    finite = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)  # other rows are in no margin
    cell29 = np.full(len(ra), -1, dtype=np.int64)
    cell29[finite] = healpix.lonlat_to_healpix(ra[finite], dec[finite], MAX_ORDER).astype(np.int64)
    k, s_pixel = int(tiles.orders[source]), int(tiles.pixels[source])
    consistent = (own == source) & ((cell29 >> (2 * (MAX_ORDER - k))) == s_pixel)
    stray = int((finite & ~consistent & (own == source)).sum())
    if stray:
        warn(f"primary partition {k}/{s_pixel}: {stray} row(s) whose (ra, dec) lie outside it")
    if not finite.all():
        warn(
            f"primary partition {k}/{s_pixel}: {int((~finite).sum())} row(s) without a valid (ra, dec), "
            "in no margin"
        )
    if c is None:
        return all_tile_candidates(ctx, consistent, ~consistent & finite, own, source, in_batch)
    active = np.flatnonzero(consistent)
    # coarse-to-fine: drop rows whose order-j cell has its 1-ring inside the source. The
    # 2-ring of an order-(j+1) cell lies in the 1-ring of its parent, and the 2-ring of a
    # cell lies in the 2-ring of its parent, so the order-c 2-ring of those rows is inside too.
    # (every third level: each cdshealpix call costs ~0.4 ms, more than the cells it would drop)
    for level in sorted(range(c - 1, k, -PRUNE_STEP)):
        if len(active) == 0:
            break
        cells, inv = np.unique(cell29[active] >> (2 * (MAX_ORDER - level)), return_inverse=True)
        owner, tile = ring_tiles(tiles, cells, level, 1)
        n_tiles = np.bincount(owner, minlength=len(cells))
        first = np.full(len(cells), -1, dtype=np.int64)
        first[owner[::-1]] = tile[::-1]
        interior = (n_tiles == 1) & (first == source)
        active = active[~interior[inv]]
    rows = (
        np.concatenate([active, np.flatnonzero(~consistent & finite)]) if not consistent.all() else active
    )
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cells, inv = np.unique(cell29[rows] >> (2 * (MAX_ORDER - c)), return_inverse=True)
    owner, tile = ring_tiles(tiles, cells, c, RING_STEPS)
    keep = in_batch[tile]
    owner, tile = owner[keep], tile[keep]
    # expand (cell, tile) to (row, tile)
    by_cell = np.argsort(inv, kind="stable")
    per_cell = np.bincount(inv, minlength=len(cells))
    first_row = np.cumsum(per_cell) - per_cell
    counts = per_cell[owner]
    pair_rows = rows[by_cell[np.repeat(first_row[owner], counts) + ranks(counts)]]
    pair_tiles = np.repeat(tile, counts)
    keep = pair_tiles != own[pair_rows]
    return pair_rows[keep], pair_tiles[keep]



def all_tile_candidates(ctx, consistent, stray, own, source, in_batch):
    """Threshold wider than order-0 cells: every destination whose cap comes within the
    threshold of the source's cap (every destination for rows lying outside their partition)."""
    centers, radii = ctx.tiles.caps()
    limit = ctx.threshold / ARCSEC_PER_RAD * CAP_SAFETY
    gap = angle(centers, centers[source][None, :]) - radii - radii[source]
    pairs = []
    for rows, tiles in (
        (np.flatnonzero(consistent), np.flatnonzero((gap <= limit) & in_batch)),
        (np.flatnonzero(stray), np.flatnonzero(in_batch)),
    ):
        pairs.append((np.tile(rows, len(tiles)), np.repeat(tiles, len(rows))))
    pair_rows = np.concatenate([p[0] for p in pairs])
    pair_tiles = np.concatenate([p[1] for p in pairs])
    keep = pair_tiles != own[pair_rows]
    return pair_rows[keep], pair_tiles[keep]



def cap_test(ctx, ra, dec, rows, dest):
    """Drop (row, tile) candidates that a bounding cap proves farther than the threshold.
    Returns the kept pairs and their ratio: 0 where the tile's centre (inside the tile) is
    within the threshold, NaN where the exact distance is still needed."""
    centers, radii = ctx.tiles.caps()
    thr_rad = ctx.threshold / ARCSEC_PER_RAD
    to_center = angle(unit(np.radians(ra[rows]), np.radians(dec[rows])), centers[dest])
    keep = to_center - radii[dest] <= thr_rad * CAP_SAFETY
    ratio = np.where(to_center <= thr_rad * (1 - 1e-12), 0.0, np.nan)
    return rows[keep], dest[keep], ratio[keep]



def decide(ctx, candidates: dict) -> dict:
    """Keep the candidates within the threshold, one ``within_threshold_of_pixel`` call per
    tile for those the cap test left undecided. Ratios stay NaN until a report needs them."""
    pending = np.flatnonzero(np.isnan(candidates["ratio"]))
    keep = np.ones(len(candidates["ratio"]), dtype=bool)
    tiles = candidates["tile"][pending]
    if len(pending):
        sort = np.argsort(tiles, kind="stable")
        bounds = np.flatnonzero(np.diff(tiles[sort])) + 1
        for group in np.split(pending[sort], bounds):
            tile = int(candidates["tile"][group[0]])
            keep[group] = within(
                candidates["ra"][group],
                candidates["dec"][group],
                int(ctx.tiles.orders[tile]),
                int(ctx.tiles.pixels[tile]),
                ctx.threshold,
            )
    return {key: value[keep] for key, value in candidates.items()}



def ratios(ctx, ra, dec, tiles) -> np.ndarray:
    """distance / threshold of each point to its tile, one distance call per tile."""
    ratio = np.zeros(len(tiles))
    if len(tiles) == 0:
        return ratio
    sort = np.argsort(tiles, kind="stable")
    bounds = np.flatnonzero(np.diff(tiles[sort])) + 1
    for group in np.split(sort, bounds):
        tile = int(tiles[group[0]])
        order, pixel = int(ctx.tiles.orders[tile]), int(ctx.tiles.pixels[tile])
        ratio[group] = distance_arcsec(ra[group], dec[group], order, pixel) / ctx.threshold
    return ratio


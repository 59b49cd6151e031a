"""The candidate search and tiling helpers against independent computations.

The coarse row set is defined by hats-import as "rows whose margin-order pixel is one of
cdshealpix.external_neighbours(P)"; candidate_pairs with one ring must give exactly that.
"""

from __future__ import annotations

import cdshealpix.nested as cds
import hats
import numpy as np
import pytest
from hats.pixel_tree.negative_tree import compute_negative_tree_pixels
from hats.pixel_tree.pixel_tree import PixelTree
from hypothesis import given, settings
from hypothesis import strategies as st

from hats_margin import geometry


def _random_tiling(rng, max_order=4, split_prob=0.4):
    """A random adaptive tiling of the whole sky (every pixel split with some probability)."""
    stack = [(0, p) for p in range(12)]
    tiles = []
    while stack:
        order, pixel = stack.pop()
        if order < max_order and rng.random() < split_prob:
            stack.extend((order + 1, 4 * pixel + k) for k in range(4))
        else:
            tiles.append((order, pixel))
    return tiles


def _external_ring(order, pixel, margin_order):
    """hats-import's coarse ring of a pixel: order-m cells outside it touching it."""
    edges, corners = cds.external_neighbours(np.array([pixel], dtype=np.uint64), order, margin_order - order)
    cells = np.concatenate([edges.ravel(), corners.ravel()]).astype(np.int64)
    return set(cells[cells >= 0].tolist())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), extra=st.integers(1, 3))
def test_one_ring_candidates_equal_the_coarse_definition(seed, extra):
    rng = np.random.default_rng(seed)
    tiles = _random_tiling(rng, max_order=3)
    tiling = geometry.Tiling.from_pixels([o for o, _ in tiles], [p for _, p in tiles])
    margin_order = max(o for o, _ in tiles) + extra
    source = tiles[rng.integers(len(tiles))]
    # random rows inside the source, as order-29 indices
    start, end = geometry.nested_range_at(*source)
    index = np.sort(rng.integers(int(start), int(end), size=3000))
    others = np.array([i for i, t in enumerate(zip(tiling.orders, tiling.pixels)) if tuple(t) != source])
    dests = geometry.Tiling(tiling.orders[others], tiling.pixels[others])

    rows, dest_idx = geometry.candidate_pairs(index, 29, *source, margin_order, 1, dests)
    got = set(zip(rows.tolist(), dest_idx.tolist()))

    cells = index >> (2 * (29 - margin_order))
    expected = set()
    for d, (order, pixel) in enumerate(zip(dests.orders.tolist(), dests.pixels.tolist())):
        ring = _external_ring(order, pixel, margin_order)
        expected |= {(r, d) for r in np.flatnonzero(np.isin(cells, list(ring))).tolist()}
    assert got == expected


def test_candidate_pairs_sorted_by_destination_then_row():
    tiling = geometry.Tiling.from_pixels([0] * 11, [p for p in range(12) if p != 4])
    start, end = geometry.nested_range_at(0, 4)
    index = np.random.default_rng(1).integers(int(start), int(end), size=20000)
    rows, dests = geometry.candidate_pairs(index, 29, 0, 4, 6, 1, tiling)
    # base pixel 4 touches 6 others (4 by an edge, 2 by a corner): the order across
    # destinations is only tested if several of them receive rows
    touching = {int(p) for p in cds.neighbours(np.array([4], dtype=np.uint64), 0)[0] if p >= 0} - {4}
    assert {int(tiling.pixels[d]) for d in np.unique(dests)} == touching
    assert np.all(np.diff(dests) >= 0)
    for d in np.unique(dests):
        assert np.all(np.diff(rows[dests == d]) > 0)


@pytest.mark.parametrize("order, pixel, cell_order", [(2, 37, 6), (0, 0, 4), (0, 11, 5), (3, 767, 7), (1, 20, 3)])
def test_border_cells_from_bits_match_neighbour_lookup(order, pixel, cell_order):
    start, end = geometry.nested_range_at(order, pixel, cell_order)
    cells = np.arange(int(start), int(end))
    for rings in (1, 2, 3):
        if (1 << (cell_order - order)) <= 2 * rings:
            continue
        mask = geometry.border_cell_mask(cells, cell_order, order, pixel, rings)
        owner, nbr = geometry.neighbourhood(cells, cell_order, rings)
        leaves = np.zeros(len(cells), dtype=bool)
        np.logical_or.at(leaves, owner, (nbr >> (2 * (cell_order - order))) != pixel)
        np.testing.assert_array_equal(mask, leaves)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_tiling_overlap_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    tiles = _random_tiling(rng)
    tiling = geometry.Tiling.from_pixels([o for o, _ in tiles], [p for _, p in tiles])
    query_order = int(rng.integers(0, 6))
    queries = rng.integers(0, 12 * 4**query_order, size=20)
    qi, ti = tiling.overlapping(query_order, queries)
    got = set(zip(qi.tolist(), ti.tolist()))
    qs, qe = geometry.nested_range_at(query_order, queries)
    expected = {
        (q, t)
        for q in range(len(queries))
        for t in range(len(tiling))
        if tiling.starts[t] < qe[q] and qs[q] < tiling.ends[t]
    }
    assert got == expected


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_negative_tree_matches_hats(seed):
    rng = np.random.default_rng(seed)
    tiles = _random_tiling(rng, max_order=5)
    keep = [t for t in tiles if rng.random() < 0.5] or [tiles[0]]
    orders, pixels = geometry.negative_tree([o for o, _ in keep], [p for _, p in keep])
    tree = PixelTree.from_healpix([hats.pixel_math.HealpixPixel(o, p) for o, p in keep])
    expected = sorted((p.order, p.pixel) for p in compute_negative_tree_pixels(tree))
    assert sorted(zip(orders.tolist(), pixels.tolist())) == expected


@pytest.mark.parametrize("order", [0, 3, 8, 13, 20])
def test_rings_needed_cover_threshold(order):
    reach = geometry.ring_reach_arcsec(order)
    assert geometry.rings_needed(reach * 0.999, order) == 1
    assert geometry.rings_needed(reach * 1.001, order) == 2
    assert geometry.rings_needed(reach * 10, order) == min(10, geometry.whole_sky_rings(order))  # 6 at order 0


def test_coarse_order_matches_hats_margin2order():
    from hats.pixel_math.healpix_shim import margin2order

    for threshold in (0.01, 0.5, 1, 5, 10, 60, 180, 360, 3600, 20000):
        assert geometry.coarse_order_for_threshold(threshold) == int(margin2order(threshold / 60)), threshold


def test_mindist_table_equals_hats_order2mindist():
    from hats.pixel_math.healpix_shim import order2mindist

    for order in range(30):
        assert geometry.coarse_reach_arcsec(order) == pytest.approx(float(order2mindist(order)) * 60.0, rel=1e-12)


def test_worker_side_modules_do_not_import_hats():
    import subprocess
    import sys

    code = (
        "import sys, hats_margin.stages.mapping, hats_margin.stages.reducing, hats_margin.runner;"
        "print('hats' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_border_cells_at_the_deepest_orders_match_the_decoded_coordinates():
    """Rings of one at a depth of up to 29 bit pairs (the bit test) equal the decoded (i, j) test."""
    rng = np.random.default_rng(5)
    for order, cell_order in [(0, 29), (3, 29), (7, 20), (10, 13)]:
        pixel = int(rng.integers(0, 12 * 4**order))
        start, end = geometry.nested_range_at(order, pixel, cell_order)
        side = 1 << (cell_order - order)
        cells = np.concatenate([rng.integers(int(start), int(end), 20_000), [int(start), int(end) - 1]])
        i, j = geometry.local_xy(cells, cell_order, order, pixel)
        for n_side in (1, 2):  # cells on the border, and one cell in from it
            edge = rng.integers(0, side, 500)
            on = np.concatenate([[0, side - 1], edge])
            extra_i = np.concatenate([np.zeros_like(on) + n_side - 1, on])
            extra_j = np.concatenate([on, np.full_like(on, side - n_side)])
            cells = np.concatenate([cells, _cells_of(order, pixel, cell_order, extra_i, extra_j)])
        i, j = geometry.local_xy(cells, cell_order, order, pixel)
        expected = (i < 1) | (j < 1) | (i >= side - 1) | (j >= side - 1)
        np.testing.assert_array_equal(geometry.border_cell_mask(cells, cell_order, order, pixel, 1), expected)
        assert expected.any() and not expected.all()


def _cells_of(order, pixel, cell_order, i, j):
    """Nested cells at ``cell_order`` of local coordinates (i, j) inside ``pixel`` (bit interleave)."""
    depth = cell_order - order
    sub = np.zeros(len(i), dtype=np.int64)
    for bit in range(depth):
        sub |= ((np.asarray(i, dtype=np.int64) >> bit) & 1) << (2 * bit)
        sub |= ((np.asarray(j, dtype=np.int64) >> bit) & 1) << (2 * bit + 1)
    return (np.int64(pixel) << (2 * depth)) + sub

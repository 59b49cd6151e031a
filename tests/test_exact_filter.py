"""The exact filter (hats_margin.exact_filter) and the certified cell caps it rests on."""

from __future__ import annotations

import astropy.units as u
import cdshealpix.nested as cds
import numpy as np
import pytest
from astropy.coordinates import Latitude, Longitude

from hats_margin import exact_filter, geometry, pixel_distance
from hats_margin.pixel_distance import cell_caps, within_threshold_of_pixel

ARCSEC = 648000.0 / np.pi


def _dense_boundary_max_arcsec(cell: int, order: int, centre_ra, centre_dec) -> float:
    """Largest distance from the centre to 4096 boundary samples per edge (long double)."""
    lon, lat = cds.vertices(np.array([cell], dtype=np.uint64), order, step=4096)
    lon = np.asarray(lon.to_value("rad")[0], dtype=np.longdouble)
    lat = np.asarray(lat.to_value("rad")[0], dtype=np.longdouble)
    b = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)
    c_lon, c_lat = np.longdouble(np.radians(centre_ra)), np.longdouble(np.radians(centre_dec))
    c = np.array([np.cos(c_lat) * np.cos(c_lon), np.cos(c_lat) * np.sin(c_lon), np.sin(c_lat)])
    d, s = b - c, b + c
    angle = 2 * np.arctan2(np.sqrt((d * d).sum(-1)), np.sqrt((s * s).sum(-1)))
    return float(angle.max()) * ARCSEC


# polar caps (pole corners, face-border edges), equator, the three-base-pixel vertices, order 0
CELLS = [(0, 0), (0, 4), (0, 11), (1, 0), (2, 63), (3, 0), (3, 255), (5, 0), (5, 4095), (5, 5000)]
CELLS += [(8, 0), (8, 3 * 4**8 - 1), (10, 4 * 4**10), (12, 11 * 4**12 + 5), (20, 123456789), (29, 7)]


@pytest.mark.parametrize("order, cell", CELLS)
def test_cell_caps_radius_bounds_the_whole_cell(order, cell):
    ra, dec, radius = cell_caps([cell], order)
    truth = _dense_boundary_max_arcsec(cell, order, ra[0], dec[0])
    assert truth <= radius[0]
    assert radius[0] <= truth * 1.04 + 1e-9  # and it is not loose: the cells are decided whole


def test_cell_caps_is_no_looser_than_needed_against_the_solver_circumradius():
    for order, cell in CELLS[::3]:
        _, _, radius = cell_caps([cell], order)
        solver = pixel_distance._solver_for(order, cell)
        assert radius[0] <= solver.circumradius * ARCSEC * 1.04


def test_one_home_for_the_geometry_constants_and_helpers():
    assert pixel_distance.MAX_ORDER is geometry.MAX_ORDER
    assert pixel_distance.unit_vectors is geometry.unit_vectors
    assert not hasattr(geometry, "cell_centres_and_radii")  # the sampled, uncertified radius
    from hats_margin.testing import synthetic

    assert synthetic.SPATIAL_INDEX_ORDER == geometry.MAX_ORDER


def _dense_rows_beside(dest_order, dest_pixel, source_pixel, n, thr, seed):
    """n rows of the order-dest_order pixel `source_pixel`, packed within 3 thresholds of its
    neighbour `dest_pixel`: (ra, dec, spatial index)."""
    rng = np.random.default_rng(seed)
    lon, lat = cds.vertices(np.array([dest_pixel], dtype=np.uint64), dest_order, step=64)
    lon, lat = lon.to_value("deg")[0], lat.to_value("deg")[0]
    out_ra, out_dec = [], []
    while sum(len(r) for r in out_ra) < n:
        k = rng.integers(0, len(lon), 4 * n)
        dist = np.radians(rng.uniform(0, 3 * thr, 4 * n) / 3600.0)
        bearing = rng.uniform(0, 2 * np.pi, 4 * n)
        la0, lo0 = np.radians(lat[k]), np.radians(lon[k])
        la1 = np.arcsin(np.sin(la0) * np.cos(dist) + np.cos(la0) * np.sin(dist) * np.cos(bearing))
        lo1 = lo0 + np.arctan2(
            np.sin(bearing) * np.sin(dist) * np.cos(la0), np.cos(dist) - np.sin(la0) * np.sin(la1)
        )
        ra, dec = np.degrees(lo1) % 360.0, np.degrees(la1)
        owner = cds.lonlat_to_healpix(Longitude(ra, u.deg), Latitude(dec, u.deg), dest_order).astype(np.int64)
        mine = owner == source_pixel
        out_ra.append(ra[mine])
        out_dec.append(dec[mine])
    ra, dec = np.concatenate(out_ra)[:n], np.concatenate(out_dec)[:n]
    index = cds.lonlat_to_healpix(Longitude(ra, u.deg), Latitude(dec, u.deg), 29).astype(np.int64)
    return ra, dec, index


@pytest.mark.parametrize("dest_order, dest_pixel, thr", [(5, 1000, 60.0), (3, 0, 600.0), (4, 1500, 3600.0)])
def test_pairs_within_threshold_equals_the_row_by_row_test_and_decides_cells_whole(
    dest_order, dest_pixel, thr, monkeypatch
):
    neighbours = cds.neighbours(np.array([dest_pixel], dtype=np.uint64), dest_order)[0]
    source = int(neighbours[neighbours >= 0][0])
    ra, dec, index = _dense_rows_beside(dest_order, dest_pixel, source, 20_000, thr, seed=dest_pixel)
    dests = geometry.Tiling.from_pixels([dest_order], [dest_pixel])
    search = max(dest_order, geometry.coarse_order_for_threshold(thr))
    rows, dest_idx = geometry.candidate_pairs(
        index, 29, dest_order, source, search, geometry.rings_needed(thr, search), dests
    )
    assert len(rows) > 10_000
    row_by_row = within_threshold_of_pixel(ra[rows], dec[rows], dest_order, dest_pixel, thr)

    tested = []

    def counting(ra_deg, *args, **kwargs):
        tested.append(len(ra_deg))
        return pixel_distance.within_thresholds_of_pixels(ra_deg, *args, **kwargs)

    monkeypatch.setattr(exact_filter, "within_thresholds_of_pixels", counting)
    keep = exact_filter.pairs_within_threshold(ra, dec, index, 29, dest_order, rows, dest_idx, dests, thr)
    assert np.array_equal(keep, row_by_row)
    assert 0 < row_by_row.sum() < len(rows)
    assert sum(tested) < len(rows) / 3  # most rows were decided a whole cell at a time


def test_sparse_rows_are_tested_one_by_one(monkeypatch):
    ra, dec, index = _dense_rows_beside(5, 1000, 1001, 50, 3600.0, seed=1)
    dests = geometry.Tiling.from_pixels([5], [1000])
    rows = np.arange(len(ra))
    called = []
    monkeypatch.setattr(exact_filter, "cell_caps", lambda *a: called.append(a) or cell_caps(*a))
    keep = exact_filter.pairs_within_threshold(
        ra, dec, index, 29, 5, rows, np.zeros_like(rows), dests, 3600.0
    )
    assert np.array_equal(keep, within_threshold_of_pixel(ra, dec, 5, 1000, 3600.0))
    assert called == []


def test_dir_rule_has_one_home_and_it_is_hats_rule():
    from hats.pixel_math.healpix_pixel import HealpixPixel

    from hats_margin import io

    for order, pixel in [(0, 5), (5, 9999), (7, 10000), (7, 123456), (12, 201326591)]:
        assert io.dir_number(pixel) == HealpixPixel(order, pixel).dir


@pytest.mark.parametrize("threshold", [1.0, 10.0, 3600.0])
def test_exact_search_needs_one_ring_only(threshold, catalogs, tmp_path):
    """Two rings of neighbours cost ~2.5x one in the candidate search: exact mode searches at
    the deepest order one ring covers (1 arcsec: order 16, not 17 with two rings)."""
    from hats_margin import MarginCacheArguments
    from hats_margin.stages import planning

    args = MarginCacheArguments(
        input_catalog_path=catalogs / "small_sky_source_catalog",
        output_path=tmp_path,
        output_artifact_name="one_ring",
        margin_threshold=threshold,
    )
    tasks = planning.make_plan(args).map_tasks
    assert {task.rings for task in tasks} == {1}
    assert geometry.ring_reach_arcsec(geometry.one_ring_order(threshold)) >= threshold
    assert geometry.ring_reach_arcsec(geometry.one_ring_order(threshold) + 1) < threshold


def _points_near_boundary(order, pixel, thr, n, seed):
    """n points outside the pixel within 2 thresholds of its boundary (ra, dec)."""
    rng = np.random.default_rng(seed)
    lon, lat = cds.vertices(np.array([pixel], dtype=np.uint64), order, step=256)
    lon, lat = np.radians(lon.to_value("deg")[0]), np.radians(lat.to_value("deg")[0])
    k = rng.integers(0, len(lon), 3 * n)
    dist = np.radians(rng.uniform(0, 2 * thr, 3 * n) / 3600.0)
    bearing = rng.uniform(0, 2 * np.pi, 3 * n)
    la = np.arcsin(np.sin(lat[k]) * np.cos(dist) + np.cos(lat[k]) * np.sin(dist) * np.cos(bearing))
    lo = lon[k] + np.arctan2(
        np.sin(bearing) * np.sin(dist) * np.cos(lat[k]), np.cos(dist) - np.sin(lat[k]) * np.sin(la)
    )
    ra, dec = np.degrees(lo) % 360.0, np.degrees(la)
    owner = cds.lonlat_to_healpix(Longitude(ra, u.deg), Latitude(dec, u.deg), order).astype(np.int64)
    return ra[owner != pixel][:n], dec[owner != pixel][:n]


@pytest.mark.parametrize(
    "order, pixel, thr", [(4, 1000, 1.0), (4, 1000, 60.0), (3, 5, 600.0), (6, 100, 10.0), (8, 11 * 4**8, 3.0)]
)
def test_polyline_bracket_spares_the_branch_and_bound_and_changes_no_answer(order, pixel, thr, monkeypatch):
    """Most rows near the threshold band are decided by the polyline bracket (chords between
    boundary points with certified interpolation allowances); the few left go to the branch and
    bound; every answer is the branch and bound's own, also at distance * (1 +- 1e-6)."""
    ra, dec = _points_near_boundary(order, pixel, thr, 4000, seed=order)
    solved = []
    real_solve = pixel_distance._Solver.solve

    def counting_solve(self, px, *args, **kwargs):
        solved.append(len(px))
        return real_solve(self, px, *args, **kwargs)

    monkeypatch.setattr(pixel_distance._Solver, "solve", counting_solve)
    fast = within_threshold_of_pixel(ra, dec, order, pixel, thr, known_outside=True)
    assert sum(solved) < len(ra) / 10
    assert 0.2 < fast.mean() < 0.8

    def no_bracket(px, py, pz, dest, polys, chord_in, chord_out):  # bounds that decide nothing
        return np.full(len(px), np.inf), np.zeros(len(px))

    monkeypatch.setattr(pixel_distance, "_many_bounds", no_bracket)
    solved.clear()
    assert np.array_equal(fast, within_threshold_of_pixel(ra, dec, order, pixel, thr, known_outside=True))
    assert sum(solved) > len(ra) / 2  # without the bracket the branch and bound decides them
    # at the threshold's edge the answers are exact
    monkeypatch.undo()
    dist = pixel_distance.distance_to_pixel_arcsec(ra[:300], dec[:300], order, pixel)
    for factor, expected in ((1 + 1e-6, True), (1 - 1e-6, False)):
        for k in range(300):
            got = within_threshold_of_pixel(ra[k : k + 1], dec[k : k + 1], order, pixel, dist[k] * factor)
            assert got[0] == expected, (ra[k], dec[k], dist[k], factor)


@pytest.mark.parametrize(
    "dest_order, dest_pixel, thresholds", [(5, 1000, [60.0, 10.0, 5.0]), (4, 1500, [3600.0, 60.0, 1200.0])]
)
def test_pairs_within_thresholds_equals_one_call_per_threshold(dest_order, dest_pixel, thresholds, monkeypatch):
    """Several thresholds in one pass, on rows dense enough to be decided by cells (at the
    largest threshold's order): row k is pairs_within_threshold at thresholds[k], and the rows
    a cell leaves undecided for some threshold are tested for all in one call."""
    top = max(thresholds)
    neighbours = cds.neighbours(np.array([dest_pixel], dtype=np.uint64), dest_order)[0]
    source = int(neighbours[neighbours >= 0][0])
    ra, dec, index = _dense_rows_beside(dest_order, dest_pixel, source, 20_000, top, seed=dest_pixel)
    dests = geometry.Tiling.from_pixels([dest_order], [dest_pixel])
    search = max(dest_order, geometry.coarse_order_for_threshold(top))
    rows, dest_idx = geometry.candidate_pairs(
        index, 29, dest_order, source, search, geometry.rings_needed(top, search), dests
    )
    singles = [
        exact_filter.pairs_within_threshold(ra, dec, index, 29, dest_order, rows, dest_idx, dests, t)
        for t in thresholds
    ]
    calls = []
    real = pixel_distance.within_thresholds_of_pixels
    monkeypatch.setattr(
        exact_filter, "within_thresholds_of_pixels", lambda *a, **kw: calls.append(len(a[0])) or real(*a, **kw)
    )
    several = exact_filter.pairs_within_thresholds(ra, dec, index, 29, dest_order, rows, dest_idx, dests, thresholds)
    assert several.shape == (len(thresholds), len(rows))
    for k, single in enumerate(singles):
        np.testing.assert_array_equal(several[k], single, err_msg=str(thresholds[k]))
        assert 0 < single.sum() < len(rows)
    assert 0 < sum(calls) < len(rows)  # cells decided some rows for every threshold, not all
    # and the row-by-row truth, for the smallest threshold
    small = min(thresholds)
    np.testing.assert_array_equal(
        several[thresholds.index(small)], within_threshold_of_pixel(ra[rows], dec[rows], dest_order, dest_pixel, small)
    )


def test_pairs_within_thresholds_with_several_destinations_and_sparse_rows():
    source = 1001
    neighbours = sorted(int(p) for p in cds.neighbours(np.array([source], dtype=np.uint64), 5)[0] if p >= 0 and p != source)
    ra, dec, index = _dense_rows_beside(5, neighbours[0], source, 300, 600.0, seed=2)
    dests = geometry.Tiling.from_pixels([5] * len(neighbours), neighbours)
    assert list(dests.pixels) == neighbours
    rows = np.repeat(np.arange(len(ra)), len(neighbours))
    dest_idx = np.tile(np.arange(len(neighbours)), len(ra))
    by_dest = np.argsort(dest_idx, kind="stable")
    rows, dest_idx = rows[by_dest], dest_idx[by_dest]
    thresholds = [600.0, 1800.0, 60.0, 60.0 * (1 + 1e-6)]
    several = exact_filter.pairs_within_thresholds(ra, dec, index, 29, 5, rows, dest_idx, dests, thresholds)
    for k, t in enumerate(thresholds):
        truth = np.concatenate([
            within_threshold_of_pixel(ra[rows[dest_idx == i]], dec[rows[dest_idx == i]], 5, p, t)
            for i, p in enumerate(neighbours)
        ])
        np.testing.assert_array_equal(several[k], truth)
    assert several.any(axis=1).all()


def _row_by_row(ra, dec, rows, dest_idx, dests, threshold):
    """Each candidate pair decided alone, against its own destination pixel."""
    keep = np.zeros(len(rows), dtype=bool)
    for i in np.unique(dest_idx):
        mine = dest_idx == i
        keep[mine] = within_threshold_of_pixel(
            ra[rows[mine]], dec[rows[mine]], int(dests.orders[i]), int(dests.pixels[i]), threshold
        )
    return keep


def test_parts_of_several_partitions_are_decided_in_one_call_as_each_alone(monkeypatch):
    """Row groups of several partitions, each with its own destinations (a dense one decided by
    cells, sparse ones one by one, one without candidates): one test of the rows left of all of
    them, and each part's mask is its pairs decided one by one against their own pixels."""
    parts = []
    # dense rows of order-5 pixel 1001 beside its neighbours: decided mostly by cells
    ra, dec, index = _dense_rows_beside(5, 1000, 1001, 4_000, 600.0, seed=3)
    near = sorted(int(p) for p in cds.neighbours(np.array([1001], dtype=np.uint64), 5)[0] if p >= 0 and p != 1001)
    dests = geometry.Tiling.from_pixels([5] * len(near), near)
    rows, dest_idx = geometry.candidate_pairs(index, 29, 5, 1001, 9, geometry.rings_needed(600.0, 9), dests)
    parts.append(exact_filter.CandidatePairs(ra, dec, index, 29, 5, rows, dest_idx, dests))
    # sparse rows of order-3 pixels near a pole and at RA 0, against mixed-order destinations
    for order, source, dest_pixels, seed in [(3, 0, [(3, 1), (4, 8), (3, 3)], 4), (3, 4 * 64 + 21, [(3, 4 * 64 + 20), (2, 5)], 5)]:
        dest_order, dest_pixel = dest_pixels[0]
        ra, dec, index = _dense_rows_beside(dest_order, dest_pixel, source, 40, 600.0, seed=seed)
        dests = geometry.Tiling.from_pixels([o for o, _ in dest_pixels], [p for _, p in dest_pixels])
        rows = np.repeat(np.arange(len(ra)), len(dests))
        dest_idx = np.tile(np.arange(len(dests)), len(ra))
        by_dest = np.argsort(dest_idx, kind="stable")
        parts.append(exact_filter.CandidatePairs(ra, dec, index, 29, 3, rows[by_dest], dest_idx[by_dest], dests))
    empty = np.zeros(0, dtype=np.int64)
    parts.insert(1, exact_filter.CandidatePairs(ra, dec, index, 29, 3, empty, empty, geometry.Tiling.from_pixels([3], [2])))

    calls = []

    def counting(ra_deg, *args, **kwargs):
        calls.append(len(ra_deg))
        return pixel_distance.within_thresholds_of_pixels(ra_deg, *args, **kwargs)

    monkeypatch.setattr(exact_filter, "within_thresholds_of_pixels", counting)
    thresholds = [600.0, 60.0]
    masks = exact_filter.pairs_within_thresholds_of_parts(parts, thresholds)
    assert len(calls) == 1 and 0 < calls[0] < sum(len(p.rows) for p in parts)  # cells decided some
    assert [m.shape for m in masks] == [(2, len(p.rows)) for p in parts]
    for part, mask in zip(parts, masks):
        for k, t in enumerate(thresholds):
            truth = _row_by_row(part.ra_deg, part.dec_deg, part.rows, part.dest_idx, part.destinations, t)
            np.testing.assert_array_equal(mask[k], truth)
    assert all(m[0].any() and not m[0].all() for m in masks if m.size)

"""Tests for hats_margin.pixel_distance against an independent brute force.

The brute force never uses the module's projection code: it samples pixel boundaries with
``cdshealpix.nested.vertices`` (descending to sub-pixels near the minimum, then sampling the
deepest cells densely with ``step``) and measures distances in extended precision. Its upper
value (distance to the nearest sample) converges quadratically and is used as the truth; its
lower value (triangle inequality over consecutive samples) is a rigorous sanity bracket.
"""

from __future__ import annotations

import math

import astropy.units as u
import cdshealpix.nested as cds
import numpy as np
import pytest
from astropy.coordinates import Latitude, Longitude
from hats.pixel_math.healpix_shim import order2mindist
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from hats_margin import pixel_distance
from hats_margin.geometry import ring_reach_arcsec
from hats_margin.pixel_distance import (
    _PixelGeometry,
    _Solver,
    distance_to_pixel_arcsec,
    within_threshold_of_pixel,
    within_thresholds_of_pixel,
)

LD = np.longdouble
PI_LD = LD("3.14159265358979323846264338327950288")
ARCSEC_LD = LD(648000) / PI_LD
ARCSEC = 648000.0 / math.pi
THREE_FACE_DEC = math.degrees(math.asin(2.0 / 3.0))  # 41.8103148957786

# Accuracy promised by the module docstring: |error| <= 1e-9 arcsec + 1e-9 * distance.
# The brute force itself carries ~2e-10 arcsec of float64 rounding from cdshealpix.
ABS_TOL = 1.3e-9
REL_TOL = 1.1e-9

SETTINGS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


# ------------------------------------------------------------------------------------------
# Independent brute force (cdshealpix sampling + extended precision)
# ------------------------------------------------------------------------------------------
def _vec_rad_ld(lon_rad, lat_rad):
    lon = np.asarray(lon_rad, dtype=LD)
    lat = np.asarray(lat_rad, dtype=LD)
    cl = np.cos(lat)
    return np.stack([cl * np.cos(lon), cl * np.sin(lon), np.sin(lat)], axis=-1)


def _vec_deg_ld(ra_deg, dec_deg):
    return _vec_rad_ld(LD(ra_deg) * PI_LD / 180, LD(dec_deg) * PI_LD / 180)


def _ang_ld(p, q):
    """Angle between unit vectors (longdouble), 2 atan2(|p-q|, |p+q|)."""
    d = q - p
    s = q + p
    return 2 * np.arctan2(np.sqrt((d * d).sum(-1)), np.sqrt((s * s).sum(-1)))


def _cell_samples(cells, depth, step, dtype=LD):
    lon, lat = cds.vertices(np.asarray(cells, dtype=np.uint64), depth, step=step, num_threads=1)
    if dtype is LD:
        return _vec_rad_ld(lon.rad, lat.rad)  # (ncells, 4 step, 3), boundary loops in order
    lon, lat = lon.rad, lat.rad
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _inside_cds(ra, dec, order, pixel):
    ipix = cds.lonlat_to_healpix(
        Longitude(np.atleast_1d(ra), u.deg), Latitude(np.atleast_1d(dec), u.deg), order
    )
    return ipix == np.uint64(pixel)


def _sample_bounds(p, cells, depth, step):
    """Float64 is enough here (~1e-16 rad); the point itself is rounded from extended precision."""
    v = _cell_samples(cells, depth, step, dtype=np.float64)
    d = _ang_ld(p, v)
    seg = _ang_ld(v, np.roll(v, -1, axis=1))
    lb_cell = ((d + np.roll(d, -1, axis=1) - seg * 1.01) / 2).min(axis=1)
    return d.min(), lb_cell, seg.max(axis=1)


def brute_force_distance(ra, dec, order, pixel, rel=2e-5, max_cells=48):
    """(truth, lower, gap) in arcsec for the distance from one point to the pixel region.

    truth: min distance to boundary samples of sub-pixels near the minimum, sampled until the
    spacing is below ``rel * distance`` (or the deepest cells are sampled with a large step);
    lower: rigorous (d_k + d_{k+1} - 1.01 arc_k) / 2 over consecutive samples;
    gap: bound on truth - D from the final spacing l (half of it along the curve):
    min(l, l^2 / (2 lower) + kappa l^2), kappa bounding the edge curvature.
    """
    if _inside_cds(ra, dec, order, pixel)[0]:
        return 0.0, 0.0, 0.0
    p = _vec_deg_ld(ra, dec).astype(np.float64)
    cells = np.array([pixel], dtype=np.int64)
    depth = order
    ub = np.inf
    while True:
        d_min, lb_cell, spacing_cell = _sample_bounds(p, cells, depth, 16)
        ub = min(ub, d_min)
        keep = lb_cell <= ub
        cells, lb_cell, spacing_cell = cells[keep], lb_cell[keep], spacing_cell[keep]
        if cells.size > max_cells:
            best = np.argsort(lb_cell)[:max_cells]
            cells, lb_cell, spacing_cell = cells[best], lb_cell[best], spacing_cell[best]
        spacing = float(spacing_cell.max())
        target = max(float(ub) * rel, 5e-16)
        if spacing <= target or depth == 29:
            break
        jump = min(29 - depth, 3 if cells.size <= 3 else (2 if cells.size <= 12 else 1))
        cells = (cells[:, None] * 4**jump + np.arange(4**jump)).ravel()
        depth += jump
    if spacing > target:
        best = np.argsort(lb_cell)[:2]
        fstep = int(min(32768, 2 ** math.ceil(math.log2(16 * spacing / target))))
        d_min, lb_cell, spacing_cell = _sample_bounds(p, cells[best], depth, fstep)
        ub = min(ub, d_min)
        spacing = float(spacing_cell.max())
    lower = max(0.0, float(lb_cell.min()))
    half = spacing / 2 * 1.01
    kappa = 10.0 * 2**order
    gap = min(half, half * half / (2 * lower) + kappa * half * half) if lower > 0 else half
    return float(ub) * ARCSEC, lower * ARCSEC, gap * ARCSEC * 1.1


# ------------------------------------------------------------------------------------------
# Point helpers
# ------------------------------------------------------------------------------------------
def _unit(ra_deg, dec_deg):
    r, d = np.radians(ra_deg), np.radians(dec_deg)
    return np.array([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def offset_point(ra0, dec0, dist_deg, bearing_deg):
    """Point at great-circle distance dist_deg from (ra0, dec0) along bearing_deg."""
    r = _unit(ra0, dec0)
    ref = np.array([0.0, 0.0, 1.0]) if abs(dec0) < 89.0 else np.array([1.0, 0.0, 0.0])
    east = np.cross(ref, r)
    east /= np.linalg.norm(east)
    north = np.cross(r, east)
    dd, b = math.radians(dist_deg), math.radians(bearing_deg)
    p = math.cos(dd) * r + math.sin(dd) * (math.cos(b) * north + math.sin(b) * east)
    ra = math.degrees(math.atan2(p[1], p[0])) % 360.0
    dec = math.degrees(math.atan2(p[2], math.hypot(p[0], p[1])))
    return ra, dec


def boundary_point(order, pixel, edge, frac):
    """A boundary point computed by cdshealpix (edge 0: S->E, 1: E->N, 2: N->W, 3: W->S)."""
    frac = min(max(frac, 0.0), 0.999999)
    dx, dy = [(frac, 0.0), (0.999999999, frac), (1 - frac, 0.999999999), (0.0, 1 - frac)][edge]
    dx, dy = min(dx, 0.999999999), min(dy, 0.999999999)
    lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order, dx, dy)
    return float(lon.deg[0]), float(lat.deg[0])


def pixel_size_deg(order):
    return 58.6 / 2**order


def nested_index(face, i, j, order):
    ipf = 0
    for b in range(order):
        ipf |= ((i >> b) & 1) << (2 * b) | ((j >> b) & 1) << (2 * b + 1)
    return (face << (2 * order)) | ipf


def _decision_margin(truth):
    """How far from a point's distance a threshold must be for its decision to be known."""
    return 1e-6 * truth if truth >= 1e-3 else 3e-9


def check_against_brute_force(ra, dec, order, pixel):
    """Compare the module with the brute force for a few points; return the truths, NaN where
    the brute force itself is not precise enough to decide a threshold at the truth +- the
    decision margin (its gap, e.g. 1e-8 arcsec for a point on a base pixel's meridian edge)."""
    got = distance_to_pixel_arcsec(np.asarray(ra), np.asarray(dec), order, pixel)
    truths = []
    for k in range(len(ra)):
        truth, lower, gap = brute_force_distance(ra[k], dec[k], order, pixel)
        tol = ABS_TOL + REL_TOL * truth
        info = (ra[k], dec[k], order, pixel, got[k], truth, lower, gap)
        assert lower - tol <= got[k] <= truth + tol, info
        assert got[k] >= truth - gap - tol, info  # precise wherever the brute force is
        if _inside_cds(ra[k], dec[k], order, pixel)[0]:
            assert got[k] == 0.0
        truths.append(truth if gap + tol <= 0.5 * _decision_margin(truth) else np.nan)
    return np.array(truths)


def check_threshold_decisions(ra, dec, order, pixel, truths):
    """At threshold = truth * (1 +- 1e-6) the mask must be True / False (for truths >= 1e-3
    arcsec, the smallest supported threshold; below that with an absolute 3e-9 arcsec margin)."""
    ra, dec = np.asarray(ra), np.asarray(dec)
    for k, truth in enumerate(truths):
        r, d = ra[k : k + 1], dec[k : k + 1]
        info = (ra[k], dec[k], order, pixel, truth)
        if _inside_cds(r, d, order, pixel)[0]:
            assert within_threshold_of_pixel(r, d, order, pixel, 0.0)[0], info
            continue
        if np.isnan(truth):  # the brute force cannot say
            continue
        margin = _decision_margin(truth)
        assert within_threshold_of_pixel(r, d, order, pixel, truth + margin)[0], info
        if truth > margin:
            assert not within_threshold_of_pixel(r, d, order, pixel, truth - margin)[0], info


# ------------------------------------------------------------------------------------------
# Boundary geometry vs cdshealpix
# ------------------------------------------------------------------------------------------
def _adversarial_pixels():
    out = [(0, p) for p in range(12)]
    for order in (1, 2, 5, 13, 29):
        n = 1 << order
        for face in range(12):
            for i, j in [(n - 1, n - 1), (0, 0), (n - 1, 0), (0, n - 1), (n // 2, n - 1), (n - 1, n // 2)]:
                out.append((order, nested_index(face, i, j, order)))
    return out


@pytest.mark.parametrize(
    "order,pixel", _adversarial_pixels()[::3] + [(3, 100), (17, 123456789), (29, 5 * 4**29 + 7)]
)
def test_edge_points_match_cdshealpix_vertices(order, pixel):
    geom = _PixelGeometry(order, pixel)
    step = 9
    expected = _cell_samples([pixel], order, step)[0]
    k = np.arange(4 * step)
    bx, by, bz = geom.evaluate(k // step, (k % step) / step)
    got = np.stack([bx, by, bz], axis=-1).astype(LD)
    err = _ang_ld(expected, got) * ARCSEC_LD
    assert float(err.max()) < 1e-9


def test_edge_points_match_healpix_to_lonlat_offsets():
    rng = np.random.default_rng(11)
    pixels = _adversarial_pixels()[1::4] + [
        (int(o), int(rng.integers(0, 12 * 4 ** int(o)))) for o in rng.integers(0, 30, 40)
    ]
    for order, pixel in pixels:
        geom = _PixelGeometry(order, pixel)
        for frac in (0.0, 0.137, 0.5, 0.9):
            lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order, frac, 0.0)
            want = _vec_rad_ld(lon.rad, lat.rad)
            got = np.stack(geom.evaluate(np.array([0]), np.array([frac])), axis=-1).astype(LD)
            assert float(_ang_ld(want, got)[0] * ARCSEC_LD) < 1e-9
            lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order, 0.0, frac)
            want = _vec_rad_ld(lon.rad, lat.rad)
            got = np.stack(geom.evaluate(np.array([3]), np.array([1.0 - frac])), axis=-1).astype(LD)
            assert float(_ang_ld(want, got)[0] * ARCSEC_LD) < 1e-9
        lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
        want = _vec_rad_ld(lon.rad, lat.rad)
        got = np.array(geom.center(), dtype=LD)
        assert float(_ang_ld(want, got)[0] * ARCSEC_LD) < 1e-9


def test_curvature_bound_holds():
    """The analytic bound M on |d2B/dt2| (the basis of every lower bound) holds numerically,
    including where it is tight (polar edges meeting a face border next to the pole)."""
    rng = np.random.default_rng(3)
    pixels = _adversarial_pixels() + [
        (int(o), int(rng.integers(0, 12 * 4 ** int(o)))) for o in rng.integers(0, 12, 150)
    ]
    worst = 0.0
    for order, pixel in pixels:
        if order > 8:
            continue  # finite differences lose precision on tiny pixels
        geom = _PixelGeometry(order, pixel)
        h = 2e-4
        t = np.linspace(h, 1 - h, 101)
        for e in range(4):
            edge = np.full(t.size, e)
            b0 = np.stack(geom.evaluate(edge, t), -1)
            bp = np.stack(geom.evaluate(edge, t + h), -1)
            bm = np.stack(geom.evaluate(edge, t - h), -1)
            second = np.linalg.norm(bp - 2 * b0 + bm, axis=-1) / h**2
            bound = geom.curvature_bound(edge, t - h, t + h)
            worst = max(worst, float(np.max(second / bound)))
            # tangent vs central differences
            tan = np.stack(geom.evaluate(edge, t, deriv=True)[3:], -1)
            fd = (bp - bm) / (2 * h)
            scale = np.linalg.norm(tan, axis=-1).max()
            assert np.max(np.linalg.norm(fd - tan, axis=-1)) < 1e-6 * scale
    assert worst <= 1.0
    assert worst > 0.9  # the bound is tight somewhere: this test exercises the polar case


def test_circumradius_is_an_upper_bound():
    rng = np.random.default_rng(5)
    for order, pixel in _adversarial_pixels()[::5]:
        solver = _Solver(_PixelGeometry(order, pixel))
        v = _cell_samples([pixel], order, 64)[0]
        lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
        c = _vec_rad_ld(lon.rad, lat.rad)
        far = float(_ang_ld(c, v).max())
        assert far <= solver.circumradius
        assert solver.circumradius < far * 1.2 + 1e-15
    del rng


# ------------------------------------------------------------------------------------------
# Distances vs brute force (random and adversarial), threshold decisions
# ------------------------------------------------------------------------------------------
@st.composite
def pixel_and_points(draw, max_points=3):
    order = draw(st.integers(0, 29))
    pixel = draw(st.integers(0, 12 * 4**order - 1))
    size = pixel_size_deg(order)
    pts = []
    for _ in range(draw(st.integers(1, max_points))):
        kind = draw(st.sampled_from(["edge", "edge", "corner", "far", "inside"]))
        if kind == "far":
            ra = draw(st.floats(0, 360, exclude_max=True))
            dec = math.degrees(math.asin(draw(st.floats(-1, 1))))
        elif kind == "inside":
            dx = draw(st.floats(0.001, 0.999))
            dy = draw(st.floats(0.001, 0.999))
            lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order, dx, dy)
            ra, dec = float(lon.deg[0]), float(lat.deg[0])
        else:
            edge = draw(st.integers(0, 3))
            frac = 0.0 if kind == "corner" else draw(st.floats(0, 1))
            ra0, dec0 = boundary_point(order, pixel, edge, frac)
            rel = 10 ** draw(st.floats(-7, 1.5))
            dist = min(size * rel, 179.0)
            ra, dec = offset_point(ra0, dec0, dist, draw(st.floats(0, 360)))
        pts.append((ra, dec))
    ra, dec = map(np.array, zip(*pts))
    return order, pixel, ra, dec


@settings(max_examples=40, **SETTINGS)
@given(pixel_and_points())
@example((0, 3, np.array([0.0]), np.array([48.590377890729144])))  # on base pixel 3's meridian edge: the
# brute force's gap (1e-8 arcsec) exceeds the decision margin (3e-9): no threshold decision asserted
def test_distance_matches_brute_force_random(case):
    order, pixel, ra, dec = case
    truths = check_against_brute_force(ra, dec, order, pixel)
    check_threshold_decisions(ra, dec, order, pixel, truths)


@settings(max_examples=30, **SETTINGS)
@given(
    order=st.integers(0, 29),
    data=st.data(),
    log_thr=st.floats(math.log10(1e-3), math.log10(36000.0)),
    bearing=st.floats(0, 360),
)
def test_threshold_decisions_across_scales(order, data, log_thr, bearing):
    """Points near the threshold band for thresholds from 1e-3 arcsec to 10 deg."""
    pixel = data.draw(st.integers(0, 12 * 4**order - 1))
    edge = data.draw(st.integers(0, 3))
    frac = data.draw(st.sampled_from([0.0, 0.5, data.draw(st.floats(0, 1))]))
    ra0, dec0 = boundary_point(order, pixel, edge, frac)
    thr = 10**log_thr
    for b in (bearing, bearing + 180.0):  # one of the two directions leaves the pixel
        ra, dec = offset_point(ra0, dec0, thr / 3600.0, b)
        truth, _, _ = brute_force_distance(ra, dec, order, pixel)
        if truth > 0:
            break
    assume(truth > 0)
    got = distance_to_pixel_arcsec(ra, dec, order, pixel)
    assert abs(got - truth) <= ABS_TOL + REL_TOL * truth
    check_threshold_decisions([ra], [dec], order, pixel, [truth])


def _special_cases():
    """(name, order, pixel, ra, dec) adversarial configurations."""
    rng = np.random.default_rng(17)
    cases = []
    for k_order, order in enumerate((0, 1, 3, 8, 16, 29)):
        n = 1 << order
        size = pixel_size_deg(order)
        dists = (0.0, 1e-10, 0.3 * size, min(2.5 * size, 40.0))
        # pixels touching the north / south pole; points at and around the poles
        face_n, face_s = (0, 8) if k_order % 2 else (3, 11)
        north = nested_index(face_n, n - 1, n - 1, order)
        south = nested_index(face_s, 0, 0, order)
        for d in dists:
            cases.append(("north pole", order, north, float(rng.uniform(0, 360)), 90.0 - d))
            cases.append(("south pole", order, south, float(rng.uniform(0, 360)), -90.0 + d))
        # the 8 vertices where only three base pixels meet: ra 0/90/180/270, dec +-asin(2/3)
        for k_v, (ra_v, sgn) in enumerate([(r, g) for r in (0.0, 90.0, 180.0, 270.0) for g in (1, -1)]):
            dec_v = sgn * THREE_FACE_DEC
            # the three cells around the vertex (one per case, cycling), points all around it
            bearings = range(0, 360, 30)
            around = sorted(
                {int(_cell_at(*offset_point(ra_v, dec_v, 1e-3 * size, b), order)) for b in bearings}
            )
            assert len(around) == 3
            pix = around[(k_v + k_order) % 3]
            for d in dists[:3]:
                ra, dec = offset_point(ra_v, dec_v, d, float(rng.uniform(0, 360)))
                cases.append(("three-face vertex", order, pix, ra, dec))
        # base-pixel corners on the equator (four faces meet)
        for k_v, ra_v in enumerate((45.0, 135.0, 315.0)):
            bearings = range(0, 360, 30)
            around = sorted(
                {int(_cell_at(*offset_point(ra_v, 0.0, 1e-3 * size, b), order)) for b in bearings}
            )
            assert len(around) == 4
            for pix in around[(k_v + k_order) % 2 :: 2]:
                for d in dists[1:3]:
                    ra, dec = offset_point(ra_v, 0.0, d, float(rng.uniform(0, 360)))
                    cases.append(("equator corner", order, pix, ra, dec))
        # across RA 0/360: a pixel touching ra = 0, points on both sides
        pix0 = int(_cell_at(1e-9, 1e-3 * min(size, 1.0), order))
        for ra in (359.9999999999, 360.0 - 0.3 * size, 0.0, 1e-12, 0.3 * size):
            cases.append(("ra wrap", order, pix0, ra % 360, 0.5 * min(size, 1.0)))
    return cases


def _cell_at(ra, dec, order):
    return cds.lonlat_to_healpix(Longitude([ra], u.deg), Latitude([dec], u.deg), order)[0]


_SPECIAL = _special_cases()


@pytest.mark.parametrize("chunk", range(4))
def test_adversarial_points(chunk):
    cases = _SPECIAL[chunk::4]
    for name, order, pixel, ra, dec in cases:
        truths = check_against_brute_force([ra], [dec], order, pixel)
        check_threshold_decisions([ra], [dec], order, pixel, truths)
        del name


def test_ra_wrap_equivalent_inputs():
    """ra given as negative, >= 360 or wrapped must give the same distance (to rounding)."""
    order = 6
    pixel = int(_cell_at(0.01, 0.2, order))
    ra = np.array([-0.3, 359.7, 719.7, -0.0001, 359.9999, 0.5])
    dec = np.array([0.1, 0.1, 0.1, 0.3, 0.3, -0.2])
    d = distance_to_pixel_arcsec(ra, dec, order, pixel)
    assert abs(d[0] - d[1]) < 1e-6 and abs(d[1] - d[2]) < 1e-6
    assert abs(d[3] - d[4]) < 1e-6
    check_against_brute_force(ra[[1, 4, 5]], dec[[1, 4, 5]], order, pixel)


def test_far_points_up_to_180_degrees():
    rng = np.random.default_rng(21)
    for order in (0, 2, 7, 20, 29):
        pixel = int(rng.integers(0, 12 * 4**order))
        lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
        ra0, dec0 = float(lon.deg[0]), float(lat.deg[0])
        vl, vb = cds.vertices(np.array([pixel], dtype=np.uint64), order)
        pts = [((ra0 + 180) % 360, -dec0), ((float(vl.deg[0, 1]) + 180) % 360, -float(vb.deg[0, 1]))]
        pts += [offset_point(ra0, dec0, dist, float(rng.uniform(0, 360))) for dist in (95.0, 150.0, 179.9)]
        ra, dec = map(np.array, zip(*pts))
        truths = check_against_brute_force(ra, dec, order, pixel)
        assert np.nanmax(truths) > (180 - pixel_size_deg(order)) * 3600
        check_threshold_decisions(ra, dec, order, pixel, truths)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "order,pixel,ra,dec",
    [(0, 0, 270.0, 0.0), (0, 0, 180.0, 1e-9), (1, 3, 270.0, 0.0), (3, 63, 180.0, 0.0), (0, 4, 0.0, 90.0)],
)
def test_points_equidistant_from_a_meridian_edge(order, pixel, ra, dec):
    """Pixels touching the pole have meridian edges (great circles); points on the equator
    90 deg away are equidistant from the whole edge: the worst case for branch and bound."""
    check_against_brute_force([ra], [dec], order, pixel)


# ------------------------------------------------------------------------------------------
# Inside / boundary points
# ------------------------------------------------------------------------------------------
@settings(max_examples=30, **SETTINGS)
@given(order=st.integers(0, 29), data=st.data())
def test_inside_points_are_zero(order, data):
    pixel = data.draw(st.integers(0, 12 * 4**order - 1))
    dx = data.draw(st.floats(0, 1, exclude_max=True))
    dy = data.draw(st.floats(0, 1, exclude_max=True))
    lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order, dx, dy)
    ra, dec = lon.deg, lat.deg
    inside = _inside_cds(ra, dec, order, pixel)
    d = distance_to_pixel_arcsec(ra, dec, order, pixel)
    if inside[0]:
        assert d[0] == 0.0
        assert within_threshold_of_pixel(ra, dec, order, pixel, 0.0)[0]
    else:  # sampled exactly on an edge owned by a neighbour
        assert d[0] <= 1e-9


@pytest.mark.parametrize("order,pixel", _adversarial_pixels()[::4] + [(10, 777), (29, 12 * 4**29 - 1)])
def test_boundary_points_have_zero_distance(order, pixel):
    lon, lat = cds.vertices(np.array([pixel], dtype=np.uint64), order, step=5)
    d = distance_to_pixel_arcsec(lon.deg.ravel(), lat.deg.ravel(), order, pixel)
    assert np.all(d <= 1e-9)
    assert np.all(within_threshold_of_pixel(lon.deg.ravel(), lat.deg.ravel(), order, pixel, 1e-9))


def test_pixel_interior_sample_inside_and_outside_split():
    """Points of a pixel's neighbours are outside, its own sub-pixel centres are inside."""
    order = 4
    pixel = 1234
    kids = np.arange(pixel * 16, pixel * 16 + 16, dtype=np.uint64)
    lon, lat = cds.healpix_to_lonlat(kids, order + 2)
    assert np.all(distance_to_pixel_arcsec(lon.deg, lat.deg, order, pixel) == 0)
    nb = cds.neighbours(np.array([pixel], dtype=np.uint64), order)[0]
    nb = nb[(nb >= 0) & (nb != pixel)].astype(np.uint64)
    lon, lat = cds.healpix_to_lonlat(nb, order)
    d = distance_to_pixel_arcsec(lon.deg, lat.deg, order, pixel)
    assert np.all(d > 0)
    assert np.all(d < 1.5 * pixel_size_deg(order) * 3600)


# ------------------------------------------------------------------------------------------
# API behaviour
# ------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_broadcasting():
    ra = np.linspace(10, 20, 12).reshape(3, 4)
    dec = np.linspace(-5, 5, 12).reshape(3, 4)
    d = distance_to_pixel_arcsec(ra, dec, 3, 300)
    m = within_threshold_of_pixel(ra, dec, 3, 300, 3600.0)
    assert d.shape == (3, 4) and d.dtype == np.float64
    assert m.shape == (3, 4) and m.dtype == np.bool_
    np.testing.assert_array_equal(m, d <= 3600.0)
    # broadcasting a scalar dec; lists; python scalars; float32 input
    d2 = distance_to_pixel_arcsec(ra, 1.5, 3, 300)
    assert d2.shape == (3, 4)
    np.testing.assert_allclose(d2[0, 0], distance_to_pixel_arcsec([float(ra[0, 0])], [1.5], 3, 300)[0])
    s = distance_to_pixel_arcsec(12.0, 1.0, 3, 300)
    assert np.ndim(s) == 0 and s.dtype == np.float64
    assert np.ndim(within_threshold_of_pixel(12.0, 1.0, 3, 300, 1.0)) == 0
    d32 = distance_to_pixel_arcsec(ra.astype(np.float32), dec.astype(np.float32), 3, 300)
    assert d32.dtype == np.float64
    # order / pixel as numpy integers
    np.testing.assert_array_equal(distance_to_pixel_arcsec(ra, dec, np.int64(3), np.uint64(300)), d)


def test_empty_input():
    for f in (
        lambda r, d: distance_to_pixel_arcsec(r, d, 5, 17),
        lambda r, d: within_threshold_of_pixel(r, d, 5, 17, 10.0),
    ):
        out = f(np.array([]), np.array([]))
        assert out.shape == (0,)
        out = f(np.zeros((0, 3)), np.zeros((0, 3)))
        assert out.shape == (0, 3)
    assert distance_to_pixel_arcsec(np.array([]), np.array([]), 5, 17).dtype == np.float64
    assert within_threshold_of_pixel(np.array([]), np.array([]), 5, 17, 1.0).dtype == np.bool_


def test_non_finite_and_invalid_arguments():
    d = distance_to_pixel_arcsec([np.nan, 10.0, np.inf], [0.0, np.nan, 0.0], 2, 10)
    assert np.all(np.isnan(d))
    assert not np.any(within_threshold_of_pixel([np.nan, 10.0], [0.0, np.nan], 2, 10, 1e9))
    # each refusal names the bad value and what is valid (a bare ValueError from numpy or
    # cdshealpix deeper down would not)
    with pytest.raises(ValueError, match=r"dec_deg must be within \[-90, 90\]"):
        distance_to_pixel_arcsec([0.0], [91.0], 2, 10)
    with pytest.raises(ValueError, match=r"dec_deg must be within \[-90, 90\]"):
        within_threshold_of_pixel([0.0, 1.0], [0.0, -90.5], 2, 10, 1.0)
    with pytest.raises(ValueError, match=r"order must be in \[0, 29\], got 30"):
        distance_to_pixel_arcsec([0.0], [0.0], 30, 0)
    with pytest.raises(ValueError, match="pixel 192 out of range for order 2"):
        distance_to_pixel_arcsec([0.0], [0.0], 2, 12 * 16)
    with pytest.raises(ValueError, match=r"order must be in \[0, 29\], got -1"):
        distance_to_pixel_arcsec([0.0], [0.0], -1, 0)
    with pytest.raises(ValueError, match="pixel -1 out of range for order 2"):
        within_threshold_of_pixel([0.0], [0.0], 2, -1, 1.0)
    with pytest.raises(ValueError, match="threshold_arcsec must not be NaN"):
        within_threshold_of_pixel([0.0], [0.0], 2, 10, float("nan"))


def test_extreme_thresholds():
    rng = np.random.default_rng(2)
    ra = rng.uniform(0, 360, 500)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))
    assert within_threshold_of_pixel(ra, dec, 4, 99, 180 * 3600.0).all()
    assert within_threshold_of_pixel(ra, dec, 4, 99, np.inf).all()
    assert not within_threshold_of_pixel(ra, dec, 4, 99, -1.0).any()
    inside = _inside_cds(ra, dec, 4, 99)
    np.testing.assert_array_equal(within_threshold_of_pixel(ra, dec, 4, 99, 0.0), inside)


@pytest.mark.parametrize(
    "order,pixel,thr", [(0, 4, 36000.0), (3, 500, 600.0), (7, 100000, 10.0), (18, 12345678901, 1e-2)]
)
def test_mask_consistent_with_distance(order, pixel, thr):
    """Many points around the pixel: mask == (distance <= thr) away from the rounding band,
    and the vectorised (chunked) path agrees with point-by-point brute force on a sample."""
    rng = np.random.default_rng(order)
    lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
    size = pixel_size_deg(order) + thr / 3600
    pts = [
        offset_point(float(lon.deg[0]), float(lat.deg[0]), size * rng.uniform(0, 1.5), rng.uniform(0, 360))
        for _ in range(3000)
    ]
    ra, dec = map(np.array, zip(*pts))
    d = distance_to_pixel_arcsec(ra, dec, order, pixel)
    m = within_threshold_of_pixel(ra, dec, order, pixel, thr)
    clear = np.abs(d - thr) > 2 * (ABS_TOL + REL_TOL * thr)
    np.testing.assert_array_equal(m[clear], (d <= thr)[clear])
    assert 0 < m.sum() < m.size
    idx = rng.choice(ra.size, 4, replace=False)
    check_against_brute_force(ra[idx], dec[idx], order, pixel)


# ------------------------------------------------------------------------------------------
# Candidate-search claim: the ring of neighbours covers ring_reach_arcsec(order)
# ------------------------------------------------------------------------------------------
def _reach_cells():
    rng = np.random.default_rng(7)
    cells = []
    for order in range(11):
        n = 1 << order
        cells += [(order, int(p)) for p in rng.integers(0, 12 * 4**order, 2)]
        # base-pixel corners (incl. the three-face vertices), poles, polar face borders
        for face in (0, 4, 9) if order % 2 else (3, 6, 11):
            for i, j in [(0, 0), (n - 1, n - 1), (n - 1, 0), (0, n - 1), (n - 1, n // 2), (n // 2, n - 1)]:
                cells.append((order, nested_index(face, i, j, order)))
    return sorted(set(cells))


_REACH_CELLS = _reach_cells()


def _ring_lower_bound_arcsec(order, cell, step=32):
    """Rigorous lower bound (brute force) on the distance from ``cell`` to any point outside
    the union of the cell and its neighbours.

    That distance is attained on the outer boundary of the union, which is covered by the
    boundaries of the second-ring cells. Both boundaries are sampled with cdshealpix; the
    bound subtracts the largest half-arc between consecutive samples of each loop (x1.01 for
    the curvature of the edges between samples).
    """
    r1 = cds.neighbours(np.array([cell], dtype=np.uint64), order)[0]
    r1 = r1[r1 >= 0]
    nb = cds.neighbours(r1.astype(np.uint64), order).ravel()
    r2 = np.setdiff1d(np.unique(nb[nb >= 0]), r1)
    outer = _cell_samples(r2, order, step, dtype=np.float64)  # (k, 4 step, 3)
    inner = _cell_samples([cell], order, step, dtype=np.float64)[0]  # (4 step, 3)
    half_outer = float(_ang_ld(outer, np.roll(outer, -1, axis=1)).max()) / 2 * 1.01
    half_inner = float(_ang_ld(inner, np.roll(inner, -1, axis=0)).max()) / 2 * 1.01
    q = outer.reshape(-1, 3)
    dots = q @ inner.T
    iq, ic = np.unravel_index(np.argmax(dots), dots.shape)
    sampled = float(_ang_ld(q[iq], inner[ic]))
    # the largest dot is the smallest angle: confirm with a few robust distances nearby
    near = np.argsort(dots.max(axis=1))[-8:]
    sampled = min(sampled, float(np.min(_ang_ld(q[near, None, :], inner[None, :, :]))))
    # the module agrees on the closest outer sample (its certified distance lies between
    # the sampled distance minus the inner half-arc and the sampled distance)
    ra = np.degrees(np.arctan2(q[iq, 1], q[iq, 0])) % 360
    dec = np.degrees(np.arctan2(q[iq, 2], np.hypot(q[iq, 0], q[iq, 1])))
    mod = float(distance_to_pixel_arcsec(ra, dec, order, cell))
    assert (sampled - half_inner) * ARCSEC - 1e-6 <= mod <= sampled * ARCSEC * (1 + 1e-9) + 1e-6
    return (sampled - half_outer - half_inner) * ARCSEC


def test_ring_reach_definition():
    for order in range(30):
        want = float(order2mindist(order)) * 60 * 0.98
        assert ring_reach_arcsec(order) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("chunk", range(4))
def test_points_within_reach_are_in_cell_or_neighbours(chunk):
    for order, cell in _REACH_CELLS[chunk::4]:
        reach = ring_reach_arcsec(order)
        lower = _ring_lower_bound_arcsec(order, cell)
        assert lower > reach, (order, cell, lower, reach)


def test_known_outside_gives_the_same_mask_for_outside_points():
    rng = np.random.default_rng(7)
    n = 20000
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    order, pixel = 4, 1234
    own = cds.lonlat_to_healpix(Longitude(ra, u.deg), Latitude(dec, u.deg), order)
    outside = own != pixel
    for threshold in (3600.0, 7200.0, 36000.0):
        full = within_threshold_of_pixel(ra[outside], dec[outside], order, pixel, threshold)
        fast = within_threshold_of_pixel(ra[outside], dec[outside], order, pixel, threshold, known_outside=True)
        np.testing.assert_array_equal(full, fast)
        assert full.any() and not full.all()


# ------------------------------------------------------------------------------------------
# Several thresholds in one pass (within_thresholds_of_pixel)
# ------------------------------------------------------------------------------------------
def _thresholds_around(truths, extra=()):
    """truth * (1 +- 1e-6) for every truth >= 1e-3 arcsec, and ``extra``, in no particular
    order: the decisions at truth * (1 +- 1e-6) are known, True / False."""
    near = [t * f for t in truths if t >= 1e-3 for f in (1 + 1e-6, 1 - 1e-6)]
    return [*near[::-1], *extra]


def check_several_thresholds(ra, dec, order, pixel, truths, thresholds, known_outside=False):
    """within_thresholds_of_pixel: row k equals within_threshold_of_pixel at thresholds[k], and
    equals the brute-force truth at truth * (1 +- 1e-6)."""
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    several = within_thresholds_of_pixel(ra, dec, order, pixel, thresholds, known_outside=known_outside)
    assert several.shape == (len(thresholds), ra.size)
    for k, thr in enumerate(thresholds):
        single = within_threshold_of_pixel(ra, dec, order, pixel, thr, known_outside=known_outside)
        np.testing.assert_array_equal(several[k], single, err_msg=f"threshold {thr!r} of {thresholds}")
    truths = np.asarray(truths)
    for k, thr in enumerate(thresholds):
        for i, truth in enumerate(truths):
            if truth >= 1e-3 and abs(thr / truth - 1) == pytest.approx(1e-6, rel=1e-3):
                assert several[k, i] == (thr > truth), (ra[i], dec[i], order, pixel, truth, thr)
    return several


@settings(max_examples=30, **SETTINGS)
@given(pixel_and_points(max_points=4), st.lists(st.floats(-1.0, 6.0), max_size=4))
def test_several_thresholds_match_single_calls_and_brute_force(case, log_extra):
    order, pixel, ra, dec = case
    truths = check_against_brute_force(ra, dec, order, pixel)
    # thresholds at the points' distances, and a few more across scales (arcsec)
    check_several_thresholds(ra, dec, order, pixel, truths, _thresholds_around(truths, [10**x for x in log_extra]))


@pytest.mark.parametrize("chunk", range(2))
def test_several_thresholds_on_adversarial_points(chunk):
    """Poles, three-face vertices, equator corners, RA 0/360: every case's point against the
    thresholds at its own distance (+- 1e-6) and at the other points' distances of its pixel."""
    by_pixel = {}
    for _, order, pixel, ra, dec in _SPECIAL[chunk::2]:
        by_pixel.setdefault((order, pixel), []).append((ra, dec))
    for (order, pixel), points in by_pixel.items():
        ra, dec = map(np.array, zip(*points))
        truths = check_against_brute_force(ra, dec, order, pixel)
        outside = truths > 0
        check_several_thresholds(ra, dec, order, pixel, truths, _thresholds_around(truths, [0.0, 5.0, 60.0]))
        if outside.any():
            check_several_thresholds(ra[outside], dec[outside], order, pixel, truths[outside],
                                     _thresholds_around(truths[outside]), known_outside=True)


@pytest.mark.parametrize(
    "order,pixel,thresholds",
    [
        (2, 100, [60.0, 10.0, 5.0]),
        (4, 1500, [5.0, 60.0, 10.0, 10.0]),  # any order, a threshold twice
        (0, 4, [36000.0, 3600.0, 1.0, 0.0, -1.0, np.inf, 180 * 3600.0]),
        (7, 100000, [10.0, 9.99999, 1e-3]),
        (1, 0, [600.0, 120.0, 30.0]),  # a north polar pixel touching the pole
    ],
)
def test_several_thresholds_on_many_points_near_the_pixel(order, pixel, thresholds):
    """Thousands of points within reach of every threshold (the bracket, its refinements and the
    shared branch and bound all run): each row is the single-threshold mask, and it is the
    distance test away from the rounding band."""
    rng = np.random.default_rng(order + pixel)
    lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
    top = max(t for t in thresholds if np.isfinite(t) and t < 180 * 3600)
    size = pixel_size_deg(order) + 1.5 * top / 3600
    pts = [
        offset_point(float(lon.deg[0]), float(lat.deg[0]), size * rng.uniform(0.3, 1.0), rng.uniform(0, 360))
        for _ in range(4000)
    ]
    ra, dec = map(np.array, zip(*pts))
    several = within_thresholds_of_pixel(ra, dec, order, pixel, thresholds)
    d = distance_to_pixel_arcsec(ra, dec, order, pixel)
    for k, thr in enumerate(thresholds):
        np.testing.assert_array_equal(several[k], within_threshold_of_pixel(ra, dec, order, pixel, thr), err_msg=str(thr))
        clear = np.abs(d - thr) > 2 * (ABS_TOL + REL_TOL * min(thr, 1e300))
        np.testing.assert_array_equal(several[k][clear], (d <= thr)[clear], err_msg=str(thr))
    finite = [t for t in thresholds if 0 < t < 180 * 3600]
    assert all(0 < several[k].sum() < len(ra) for k, t in enumerate(thresholds) if t in finite and t >= 1.0)


def test_several_thresholds_shapes_and_arguments():
    assert within_thresholds_of_pixel(12.0, 1.0, 3, 300, [1.0, 3600.0]).shape == (2,)
    assert within_thresholds_of_pixel([[12.0, 13.0]], [1.0], 3, 300, [1.0]).shape == (1, 1, 2)
    assert within_thresholds_of_pixel([12.0, 13.0], [1.0, 2.0], 3, 300, []).shape == (0, 2)
    assert within_thresholds_of_pixel([], [], 3, 300, [5.0, 1.0]).shape == (2, 0)
    assert not within_thresholds_of_pixel([np.nan], [0.0], 3, 300, [1e9, np.inf]).any()
    with pytest.raises(ValueError, match="NaN"):
        within_thresholds_of_pixel([0.0], [0.0], 2, 10, [1.0, float("nan")])
    with pytest.raises(ValueError):
        within_thresholds_of_pixel([0.0], [0.0], 2, -1, [1.0])


def test_several_thresholds_send_no_more_points_to_the_branch_and_bound_than_one_call_each(monkeypatch):
    """The shared bracket must not leave more points for the branch and bound than separate calls
    do (each threshold's own polyline refines the points its threshold leaves open, even when a
    larger threshold with the same polyline had decided them)."""
    solved = []
    real = _Solver.solve
    monkeypatch.setattr(_Solver, "solve", lambda self, px, *a, **kw: solved.append(len(px)) or real(self, px, *a, **kw))
    rng = np.random.default_rng(5)
    order, pixel, thresholds = 3, 300, [60.0, 10.0, 5.0]
    lon, lat = cds.vertices(np.array([pixel], dtype=np.uint64), order, step=256)
    k = rng.integers(0, lon.shape[1], 20000)
    pts = [offset_point(float(lon.deg[0, i]), float(lat.deg[0, i]), rng.uniform(0, 70) / 3600, rng.uniform(0, 360)) for i in k]
    ra, dec = map(np.array, zip(*pts))
    singles = [within_threshold_of_pixel(ra, dec, order, pixel, t) for t in thresholds]
    separate, solved[:] = sum(solved), []
    several = within_thresholds_of_pixel(ra, dec, order, pixel, thresholds)
    np.testing.assert_array_equal(several, np.array(singles))
    assert 0 < sum(solved) <= separate


@pytest.mark.parametrize("segments_per_point", [False, True])
def test_segment_chords_in_place_equal_the_plain_formula_bit_for_bit(segments_per_point):
    """_segment_chords computes |Q - clip((Q . D) / |D|^2, 0, 1) D| (Q = P - A) in place into a few
    arrays: every operation in the written order, so the certified bounds built on it are the
    formula's to the last bit, for both shapes it is called with (all points against every coarse
    chord; each point against its own fine chords), degenerate segments (|D| = 0) included, and
    its inputs are left untouched."""
    from hats_margin.pixel_distance import _segment_chords

    rng = np.random.default_rng(7)
    n, s = 400, 32
    points = [rng.normal(size=(n, 1)) for _ in range(3)]
    shape = (n, s) if segments_per_point else (s,)
    segments = [rng.normal(size=shape) for _ in range(6)] + [np.abs(rng.normal(size=shape))]
    segments[6][..., :3] = 0.0
    copies = [a.copy() for a in points + segments]

    px, py, pz = points
    ax, ay, az, dx, dy, dz, inv = segments
    qx, qy, qz = px - ax, py - ay, pz - az
    u = np.clip((qx * dx + qy * dy + qz * dz) * inv, 0.0, 1.0)
    ex, ey, ez = qx - u * dx, qy - u * dy, qz - u * dz
    expected = np.sqrt(ex * ex + ey * ey + ez * ez)

    got = _segment_chords(*points, *segments)
    assert got.shape == (n, s) and np.array_equal(got, expected)
    assert all(np.array_equal(a, b) for a, b in zip(points + segments, copies))


# ------------------------------------------------------------------------------------------
# Many pixels in one pass (within_thresholds_of_pixels, distance_bounds_to_pixels_arcsec)
# ------------------------------------------------------------------------------------------
def _points_beside_many_pixels(seed, per_pixel=300):
    """(ra, dec, dest, orders, pixels): points outside their own pixel, near it, for pixels of
    orders 0-12 (polar, equatorial, base-pixel corners, the pole, RA 0), dest shuffled."""
    rng = np.random.default_rng(seed)
    pixels = [(0, 4), (1, 0), (2, 100), (3, 300), (5, 1000), (8, 600000), (12, 12 * 4**12 - 1),
              (3, nested_index(3, 7, 7, 3)), (4, int(_cell_at(1e-9, 1e-3, 4)))]
    ra, dec, dest = [], [], []
    for k, (order, pixel) in enumerate(pixels):
        lon, lat = cds.vertices(np.array([pixel], dtype=np.uint64), order, step=64)
        at = rng.integers(0, lon.shape[1], per_pixel)
        reach = min(pixel_size_deg(order), 1.0)
        for i in at:
            ra.append(0.0)
            ra[-1], d = offset_point(float(lon.deg[0, i]), float(lat.deg[0, i]), reach * rng.uniform(0, 0.3), rng.uniform(0, 360))
            dec.append(d)
            dest.append(k)
    ra, dec, dest = np.array(ra), np.array(dec), np.array(dest)
    orders, pix = (np.array(c) for c in zip(*pixels))
    outside = np.array([not _inside_cds(r, d, int(orders[k]), int(pix[k]))[0] for r, d, k in zip(ra, dec, dest)])
    shuffle = rng.permutation(int(outside.sum()))
    return ra[outside][shuffle], dec[outside][shuffle], dest[outside][shuffle], orders, pix


def test_many_pixels_in_one_pass_equal_one_call_per_pixel():
    """Each point against its own pixel in one call: the same mask as within_thresholds_of_pixel
    per pixel (known_outside), for thresholds that leave points to the branch and bound, and the
    distance test away from the rounding band."""
    ra, dec, dest, orders, pixels = _points_beside_many_pixels(3)
    d = np.empty(ra.size)
    for k in range(len(orders)):
        mine = dest == k
        d[mine] = distance_to_pixel_arcsec(ra[mine], dec[mine], int(orders[k]), int(pixels[k]))
    # thresholds at some points' own distances (+- 1e-6: the branch and bound decides them)
    near = [float(t) * f for t in d[:: max(1, ra.size // 6)] for f in (1 + 1e-6, 1 - 1e-6)]
    thresholds = [3600.0, 60.0, 5.0, 0.0, *near, np.inf, -1.0]
    many = pixel_distance.within_thresholds_of_pixels(ra, dec, dest, orders, pixels, thresholds)
    assert many.shape == (len(thresholds), ra.size)
    for k in range(len(orders)):
        mine = np.flatnonzero(dest == k)
        one = within_thresholds_of_pixel(ra[mine], dec[mine], int(orders[k]), int(pixels[k]), thresholds, known_outside=True)
        np.testing.assert_array_equal(many[:, mine], one, err_msg=str((orders[k], pixels[k])))
    for k, thr in enumerate(thresholds):
        clear = np.abs(d - thr) > 2 * (ABS_TOL + REL_TOL * min(abs(thr), 1e300))
        np.testing.assert_array_equal(many[k][clear], (d <= thr)[clear], err_msg=str(thr))
    assert all(0 < many[k].sum() < ra.size for k in (1, 2))


def test_many_pixels_on_adversarial_points_match_the_brute_force():
    """Poles, three-face vertices, equator corners and RA 0/360, all pixels in one call: the
    decisions at each point's brute-force distance * (1 +- 1e-6)."""
    cases = [c for c in _SPECIAL if not _inside_cds(c[3], c[4], c[1], c[2])[0]][::3]
    keys = sorted({(order, pixel) for _, order, pixel, _, _ in cases})
    orders, pixels = (np.array(c) for c in zip(*keys))
    ra = np.array([c[3] for c in cases])
    dec = np.array([c[4] for c in cases])
    dest = np.array([keys.index((c[1], c[2])) for c in cases])
    truths = np.array([brute_force_distance(c[3], c[4], c[1], c[2])[0] for c in cases])
    assert np.all(truths >= 0) and np.any(truths > 3600)
    above = pixel_distance.within_thresholds_of_pixels(ra, dec, dest, orders, pixels, [])
    assert above.shape == (0, ra.size)
    for i in range(ra.size):
        thr = [truths[i] * (1 + 1e-6), truths[i] * (1 - 1e-6)] if truths[i] >= 1e-3 else [truths[i] + 3e-9]
        got = pixel_distance.within_thresholds_of_pixels(ra, dec, dest, orders, pixels, thr)[:, i]
        assert got[0] and (len(thr) == 1 or not got[1]), cases[i]


def test_many_pixels_arguments():
    with pytest.raises(ValueError, match="dest has 1 entries for 2 points"):
        pixel_distance.within_thresholds_of_pixels([1.0, 2.0], [0.0, 0.0], [0], [3], [300], [5.0])
    with pytest.raises(ValueError, match="NaN"):
        pixel_distance.within_thresholds_of_pixels([1.0], [0.0], [0], [3], [300], [float("nan")])
    with pytest.raises(ValueError, match="out of range"):
        pixel_distance.within_thresholds_of_pixels([1.0], [0.0], [0], [3], [10**6], [5.0])
    got = pixel_distance.within_thresholds_of_pixels([np.nan, 12.0], [0.0, 1.0], [0, 0], [3], [300], [1e9])
    assert got.tolist() == [[False, True]]
    lower, upper = pixel_distance.distance_bounds_to_pixels_arcsec([], [], [], [3], [300], 10.0)
    assert lower.size == upper.size == 0


@pytest.mark.parametrize("resolution", [1.0, 60.0, 3600.0])
def test_distance_bounds_bracket_the_distance_and_are_narrow(resolution):
    """The polyline bracket of many pixels' distances holds the exact distance (the module's own,
    itself checked against the brute force above, and the brute force on a sample) and is about
    a 32nd of the resolution wide (the finest polyline's allowance at most)."""
    ra, dec, dest, orders, pixels = _points_beside_many_pixels(11, per_pixel=120)
    lower, upper = pixel_distance.distance_bounds_to_pixels_arcsec(ra, dec, dest, orders, pixels, resolution)
    d = np.empty(ra.size)
    for k in range(len(orders)):
        mine = dest == k
        d[mine] = distance_to_pixel_arcsec(ra[mine], dec[mine], int(orders[k]), int(pixels[k]))
    tol = ABS_TOL + REL_TOL * d
    assert np.all(lower <= d + tol) and np.all(d <= upper + tol)
    for i in range(0, ra.size, 97):
        truth, _, _ = brute_force_distance(ra[i], dec[i], int(orders[dest[i]]), int(pixels[dest[i]]))
        assert lower[i] - tol[i] <= truth <= upper[i] + tol[i]
    # the finest polyline (64 fine chords per coarse one) bounds how narrow a coarse pixel gets
    finest = np.array([
        pixel_distance._solver_for(int(o), int(p)).polyline(0.0).fine_chords(np.arange(32))[7].max() for o, p in zip(orders, pixels)
    ]) * 2 * ARCSEC
    assert np.all(upper - lower <= np.maximum(resolution / 16, 2.2 * finest[dest]))


# the pixels of the construction tests: polar caps (face borders, pole corners), equator, three-face
# vertices, orders 0-12
_BUILD_KEYS = [(0, 0), (0, 5), (0, 11), (1, 0), (1, 47), (2, 63), (3, 0), (3, 4 * 64 + 21), (3, 11 * 64 + 63),
               (5, 0), (5, 4**5 - 1), (5, 4 * 4**5), (8, 3 * 4**8 + 5), (10, 9 * 4**10 + 12345), (12, 7 * 4**12 + 99)]


def _tables_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and all(
        np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_solvers_and_polylines_built_together_equal_each_built_alone():
    """The geometry of many pixels built in one pass (a map worker's new destinations) is, bit for
    bit, each pixel's built alone: solver tables, centre, circumradius, coarse chords and, filled
    in any order and in parts, every fine chord."""
    pixels = [pixel_distance._PixelGeometry(o, p) for o, p in _BUILD_KEYS]
    together = pixel_distance._solver_tables(pixel_distance._Pixels(pixels))
    for geom, tables in zip(pixels, together):
        assert _tables_equal(tables, pixel_distance._solver_tables(pixel_distance._Pixels([geom]))[0]), (geom.order, geom.pixel)
    for fine in (1, 8, 64):
        polys = pixel_distance._polylines(pixel_distance._Pixels(pixels), pixels, fine)
        rng = np.random.default_rng(fine)
        # some pieces of some polylines first, in one pass for all of them, then the rest
        pixel_distance._fill_fine([(poly, rng.choice(32, 5)) for poly in polys[::2]])
        for geom, poly in zip(pixels, polys):
            alone = pixel_distance._polylines(pixel_distance._Pixels([geom]), [geom], fine)[0]
            np.testing.assert_array_equal(poly.coarse_stack, alone.coarse_stack)
            order = rng.permutation(32)
            for part in np.array_split(order, 3):
                alone.fine_chords(part)
            np.testing.assert_array_equal(poly.fine_chords(np.arange(32)), alone.fine_stack)
            assert alone.fine_built.all() and poly.fine_built.all()


def test_fine_chords_are_the_boundary_pieces():
    """Each fine chord joins two boundary points of its own coarse piece (the parameters of
    ``_PixelGeometry.evaluate``) and its allowance is at least the curvature bound's M h^2 / 8
    (what makes the bracket certified), and not much more."""
    for order, pixel in _BUILD_KEYS[::3]:
        geom = pixel_distance._PixelGeometry(order, pixel)
        fine = 8
        poly = pixel_distance._polylines(pixel_distance._Pixels([geom]), [geom], fine)[0]
        chords = poly.fine_chords(np.arange(32))  # (8, pieces, fine)
        for piece in (0, 9, 17, 31):
            edge, q = divmod(piece, pixel_distance._POLY_COARSE)
            t = (q * fine + np.arange(fine + 1)) / (pixel_distance._POLY_COARSE * fine)
            bx, by, bz = geom.evaluate(np.full(fine + 1, edge), t)
            np.testing.assert_allclose(chords[0:3, piece].T, np.stack([bx, by, bz], -1)[:-1], rtol=0, atol=1e-15)
            ends = np.stack([bx, by, bz], -1)[1:]
            np.testing.assert_allclose((chords[0:3, piece] + chords[3:6, piece]).T, ends, rtol=0, atol=1e-15)
            m = geom.curvature_bound(np.full(fine, edge), t[:-1], t[1:])
            allowance = m * np.diff(t) ** 2 / 8
            assert np.all(chords[7, piece] >= allowance) and np.all(chords[7, piece] <= allowance * (1 + 1e-11) + 2e-15)


def test_a_pixel_listed_twice_has_one_solver():
    """Destinations of several row groups tested together name some pixels more than once: each
    pixel gets one solver (built once), and every point the one of its own pixel."""
    pixel_distance._GEOMETRY_CACHE.clear()
    orders = np.array([3, 5, 3, 4, 5])
    pixels = np.array([300, 1000, 300, 17, 1000])
    dest = np.array([0, 2, 1, 4, 3, 2, 0])
    solvers, local = pixel_distance._solvers_of(dest, orders, pixels)
    assert len(solvers) == 3 and len({id(s) for s in solvers}) == 3
    assert [(solvers[k].g.order, solvers[k].g.pixel) for k in local] == [(int(orders[d]), int(pixels[d])) for d in dest]
    assert len(pixel_distance._GEOMETRY_CACHE) == 3

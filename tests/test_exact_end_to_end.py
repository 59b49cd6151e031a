"""Exact mode end to end on a catalog with points at the awkward places: 0 missing, 0 extra.

The catalog holds a background and a cluster (so partitions range over several orders and a
negative tree exists), points exactly on every destination pixel's corners and edge midpoints,
at the poles, across RA 0/360, at the 8 three-base-pixel vertices, and, for every destination
pixel, points on the rays from its centre through its corners and edge midpoints placed at
``threshold * (1 - 1e-6)`` and ``threshold * (1 + 1e-6)`` from the pixel (solved with
``distance_to_pixel_arcsec`` to 1e-10 relative).
"""

from __future__ import annotations

import shutil

import cdshealpix.nested as cds
import hats
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hats_margin import MarginCacheArguments, pipeline_with_client
from hats_margin.pixel_distance import distance_to_pixel_arcsec
from hats_margin.testing.synthetic import (
    THREE_PIXEL_VERTICES_DEG,
    points_table,
    spatial_index,
    write_hats_catalog,
)
from hats_margin.verify import verify_margin

MAX_ROWS = 250
EMPTY_BASE_PIXELS = (8, 10)
"""Kept empty (points falling there are dropped) so that the negative tree is not empty."""
REL = 1e-6
ARCSEC = np.pi / (180 * 3600)


def _unit(ra_deg, dec_deg):
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _radec(v):
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0, np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))


def _base_points(rng):
    n = 3000  # north of -20 deg only, so that the south is mostly a negative tree
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-20)), 1, n)))
    cluster = _radec(_unit(45.0, 30.0) + rng.normal(0, 0.04, (1500, 3)))  # forces deeper partitions
    special = [(0.0, 90.0), (123.4, 90.0), (0.0, -90.0), (300.0, -90.0), (17.0, 89.9999), (200.0, -89.9999)]
    for dec_ in (0.0, 12.5, -41.8, 60.0):
        special += [(0.0, dec_), (360.0, dec_), (1e-10, dec_), (360.0 - 1e-10, dec_)]
    special += list(THREE_PIXEL_VERTICES_DEG)
    sra, sdec = np.array(special).T
    return np.concatenate([ra, cluster[0], sra]), np.concatenate([dec, cluster[1], sdec])


def _rays(order, pixel, targets_arcsec):
    """Points beyond each corner and edge midpoint of a pixel, on the ray from its centre,
    at each target distance from the pixel. Returns ra, dec, target index."""
    lon, lat = cds.healpix_to_lonlat(np.array([pixel], dtype=np.uint64), order)
    center = _unit(lon.to_value("deg"), lat.to_value("deg"))[0]
    vlon, vlat = cds.vertices(np.array([pixel], dtype=np.uint64), order, step=2)
    boundary = _unit(vlon.to_value("deg")[0], vlat.to_value("deg")[0])  # corners and edge midpoints
    away = boundary * (boundary @ center)[:, None] - center
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    b = np.repeat(boundary, len(targets_arcsec), axis=0)
    u = np.repeat(away, len(targets_arcsec), axis=0)
    target = np.tile(np.asarray(targets_arcsec, dtype=np.float64), len(boundary))
    s = target * ARCSEC
    for _ in range(30):
        ra, dec = _radec(np.cos(s)[:, None] * b + np.sin(s)[:, None] * u)
        d = distance_to_pixel_arcsec(ra, dec, order, pixel)
        if np.all(np.abs(d / target - 1) < 1e-10):
            break
        s = s * np.where(d > 0, target / np.where(d > 0, d, 1), 2.0)
    ok = np.abs(d / target - 1) < 1e-9
    return ra[ok], dec[ok], np.tile(np.arange(len(targets_arcsec)), len(boundary))[ok]


def _adversarial_points(catalog, threshold):
    primary = hats.read_hats(catalog)
    destinations = list(primary.get_healpix_pixels()) + list(primary.generate_negative_tree_pixels())
    ra, dec, kind, target = [], [], [], []
    for dest in destinations:
        vlon, vlat = cds.vertices(np.array([dest.pixel], dtype=np.uint64), dest.order, step=2)
        ra.append(vlon.to_value("deg")[0] % 360.0)
        dec.append(vlat.to_value("deg")[0])
        kind += ["boundary"] * 8
        target += [f"{dest.order}/{dest.pixel}"] * 8
        r, d, side = _rays(dest.order, dest.pixel, [threshold * (1 - REL), threshold * (1 + REL)])
        ra.append(r)
        dec.append(d)
        kind += ["inside" if s == 0 else "outside" for s in side]
        target += [f"{dest.order}/{dest.pixel}"] * len(r)
    for vra, vdec in THREE_PIXEL_VERTICES_DEG:
        for sign in (-1, 1):
            for rel in (1 - REL, 1 + REL):
                ra.append(np.array([vra]))
                dec.append(np.array([vdec + sign * threshold * rel / 3600.0]))
                kind.append("vertex")
                target.append("")
    return np.concatenate(ra), np.concatenate(dec), kind, target


def _table(ra, dec, kind, target):
    keep = ~np.isin(spatial_index(ra, dec) >> 58, EMPTY_BASE_PIXELS)
    return points_table(ra[keep], dec[keep], kind=np.asarray(kind)[keep], target=np.asarray(target)[keep])


def _catalog(path, threshold):
    """Base + adversarial points, re-placed until the partitioning they were placed for is final."""
    rng = np.random.default_rng(7)
    base_ra, base_dec = _base_points(rng)
    table = _table(base_ra, base_dec, ["base"] * len(base_ra), [""] * len(base_ra))
    for _ in range(4):
        write_hats_catalog(
            table, path, catalog_name="adversarial", max_rows_per_partition=MAX_ROWS, overwrite=True
        )
        before = set(hats.read_hats(path).get_healpix_pixels())
        ra, dec, kind, target = _adversarial_points(path, threshold)
        table = _table(
            np.concatenate([base_ra, ra]),
            np.concatenate([base_dec, dec]),
            ["base"] * len(base_ra) + kind,
            [""] * len(base_ra) + target,
        )
        write_hats_catalog(
            table, path, catalog_name="adversarial", max_rows_per_partition=MAX_ROWS, overwrite=True
        )
        if set(hats.read_hats(path).get_healpix_pixels()) == before:
            return path
    raise AssertionError("the partitioning did not settle")


@pytest.fixture(scope="module", params=[60.0, 10800.0], ids=["1arcmin", "3deg"])
def built(request, client, tmp_path_factory):
    """(threshold, adversarial catalog, its exact margin)."""
    threshold = request.param
    root = tmp_path_factory.mktemp(f"adversarial_{threshold:g}")
    catalog = _catalog(root / "adversarial", threshold)
    args = MarginCacheArguments(
        input_catalog_path=catalog,
        output_path=root,
        output_artifact_name="margin",
        margin_threshold=threshold,
        progress_bar=False,
    )
    pipeline_with_client(args, client)
    return threshold, catalog, root / "margin"


def _margin_file(margin, order, pixel):
    return (
        margin / "dataset" / f"Norder={order}" / f"Dir={(pixel // 10000) * 10000}" / f"Npix={pixel}.parquet"
    )


def test_exact_margin_of_adversarial_points_is_exact(built):
    threshold, catalog, margin = built
    primary = hats.read_hats(catalog)
    assert len({p.order for p in primary.get_healpix_pixels()}) >= 3
    assert primary.generate_negative_tree_pixels()

    report = verify_margin(margin)
    assert report.missing == 0 and report.extra == 0, report.summary()
    assert report.altered == 0 and report.duplicates == 0 and report.structural == [], report.summary()
    assert report.ok and report.exact and report.threshold_arcsec == threshold

    # without the verifier: the 1 - 1e-6 points are in their pixel's margin, the 1 + 1e-6 ones are not
    rows = pq.read_table(catalog / "dataset", columns=["id", "kind", "target"]).to_pydict()
    by_target: dict[str, dict[str, set]] = {}
    for id_, kind, target in zip(rows["id"], rows["kind"], rows["target"]):
        if kind in ("inside", "outside"):
            by_target.setdefault(target, {"inside": set(), "outside": set()})[kind].add(id_)
    assert sum(len(v["inside"]) for v in by_target.values()) > 100
    for target, ids in by_target.items():
        file = _margin_file(margin, *(int(x) for x in target.split("/")))
        margin_ids = set(pq.read_table(file, columns=["id"])["id"].to_pylist()) if file.exists() else set()
        assert ids["inside"] <= margin_ids, target
        assert not ids["outside"] & margin_ids, target


def test_a_removed_row_at_the_threshold_is_missing(built, tmp_path):
    """A margin missing one of the rows placed at 1 - 1e-6 thresholds from its pixel."""
    _, _, margin = built
    damaged = tmp_path / "margin"
    shutil.copytree(margin, damaged)
    for file in sorted((damaged / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet")):
        table = pq.ParquetFile(file).read()
        pixel = f"{file.parts[-3].split('=')[1]}/{file.name.split('=')[1].split('.')[0]}"
        kinds, targets = np.asarray(table["kind"].to_pylist()), np.asarray(table["target"].to_pylist())
        placed = np.flatnonzero((kinds == "inside") & (targets == pixel))
        if len(placed):
            pq.write_table(table.take(pa.array(np.setdiff1d(np.arange(table.num_rows), placed[:1]))), file)
            break
    else:
        raise AssertionError("no margin file holds a row placed at 1 - 1e-6 thresholds from its pixel")
    report = verify_margin(damaged)
    assert report.missing == 1 and report.missing_examples[0]["pixel"] == pixel
    assert report.missing_examples[0]["distance_ratio"] == pytest.approx(1 - REL, rel=1e-8)


def test_rows_a_hair_beyond_a_lower_threshold_are_extra_or_borderline(built):
    """Checked against a threshold 1e-8 below the rows placed at 1 - 1e-6: those rows become
    extras, or borderline with a tolerance above 1e-8."""
    threshold, _, margin = built
    lower = threshold * (1 - REL) * (1 - 1e-8)
    strict = verify_margin(margin, threshold_arcsec=lower)
    assert strict.missing == 0 and strict.extra > 100 and not strict.ok
    assert 1 < strict.max_extra_distance_ratio < 1 + 2e-8
    tolerant = verify_margin(margin, threshold_arcsec=lower, rtol=1e-7)
    assert tolerant.extra == 0 and tolerant.borderline == strict.extra and tolerant.ok, tolerant.summary()

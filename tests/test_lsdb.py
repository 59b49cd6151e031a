"""lsdb, the real client: a crossmatch through our (exact) margin equals a brute-force crossmatch."""

from __future__ import annotations

import cdshealpix.nested as cds
import lsdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from astropy import units as u
from astropy.coordinates import Latitude, Longitude

from hats_margin import MarginCacheArguments, pipeline_with_client
from hats_margin.testing.synthetic import write_hats_catalog

CATALOG = "small_sky_source_catalog"
THRESHOLD_ARCSEC = 60.0


@pytest.fixture(scope="module")
def margin(client, catalogs, tmp_path_factory):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / CATALOG, output_path=tmp_path_factory.mktemp("lsdb"),
        output_artifact_name="sources_1arcmin", margin_threshold=THRESHOLD_ARCSEC, progress_bar=False,
    )
    result = pipeline_with_client(args, client)
    assert result.fine_filtering and result.total_rows > 0
    return result.catalog_path


@pytest.fixture(scope="module")
def right(catalogs):
    frame = pd.read_parquet(catalogs / CATALOG / "dataset", columns=["source_id", "source_ra", "source_dec"])
    return frame.rename(columns={"source_ra": "ra", "source_dec": "dec"}).reset_index(drop=True)


@pytest.fixture(scope="module")
def left(right):
    """Every source moved by 0.2..0.95 x the threshold in a random direction (plus its neighbours)."""
    rng = np.random.default_rng(11)
    distance = np.radians(rng.uniform(0.2, 0.95, len(right)) * THRESHOLD_ARCSEC / 3600)
    bearing = rng.uniform(0, 2 * np.pi, len(right))
    ra, dec = destination(np.radians(right["ra"].to_numpy()), np.radians(right["dec"].to_numpy()), distance, bearing)
    return pd.DataFrame({"left_id": np.arange(len(right)), "ra": np.degrees(ra) % 360, "dec": np.degrees(dec)})


def destination(ra, dec, distance, bearing):
    """Point at angular ``distance`` from (ra, dec) along ``bearing`` (radians)."""
    sin_dec = np.sin(dec) * np.cos(distance) + np.cos(dec) * np.sin(distance) * np.cos(bearing)
    new_dec = np.arcsin(sin_dec)
    new_ra = ra + np.arctan2(np.sin(bearing) * np.sin(distance) * np.cos(dec), np.cos(distance) - np.sin(dec) * sin_dec)
    return new_ra, new_dec


def brute_force_pairs(left: pd.DataFrame, right: pd.DataFrame, radius_arcsec: float) -> set[tuple[int, int]]:
    """Every (left_id, source_id) within radius: haversine distances of all pairs, in dec bands."""
    radius = np.radians(radius_arcsec / 3600)
    r_order = np.argsort(right["dec"].to_numpy())
    r_dec = np.radians(right["dec"].to_numpy()[r_order])
    r_ra = np.radians(right["ra"].to_numpy()[r_order])
    r_id = right["source_id"].to_numpy()[r_order]
    left = left.sort_values("dec")  # so that each chunk of left rows needs a narrow band of right rows
    l_ra, l_dec = np.radians(left["ra"].to_numpy()), np.radians(left["dec"].to_numpy())
    l_id = left["left_id"].to_numpy()
    pairs = set()
    for start in range(0, len(left), 512):
        sl = slice(start, start + 512)
        lo = np.searchsorted(r_dec, l_dec[sl].min() - radius, "left")
        hi = np.searchsorted(r_dec, l_dec[sl].max() + radius, "right")
        d_dec = l_dec[sl, None] - r_dec[None, lo:hi]
        d_ra = l_ra[sl, None] - r_ra[None, lo:hi]
        hav = np.sin(d_dec / 2) ** 2 + np.cos(l_dec[sl, None]) * np.cos(r_dec[None, lo:hi]) * np.sin(d_ra / 2) ** 2
        i, j = np.nonzero(2 * np.arcsin(np.sqrt(np.clip(hav, 0, 1))) <= radius)
        pairs.update(zip(l_id[sl][i].tolist(), r_id[lo:hi][j].tolist()))
    return pairs


def crossmatch_pairs(left_catalog, right_catalog, radius_arcsec: float, n_neighbors: int) -> set[tuple[int, int]]:
    result = left_catalog.crossmatch(
        right_catalog, radius_arcsec=radius_arcsec, n_neighbors=n_neighbors, suffixes=("_l", "_r"),
        suffix_method="all_columns",
    ).compute()
    counts = result["left_id_l"].value_counts()
    assert counts.max() < n_neighbors, "n_neighbors was a cap: raise it"
    return set(zip(result["left_id_l"].tolist(), result["source_id_r"].tolist()))


def owner(ra_deg, dec_deg, partitions: list[tuple[int, int]]) -> np.ndarray:
    """Index into partitions of the partition holding each point (-1: none)."""
    found = np.full(len(ra_deg), -1)
    for k, (order, pixel) in enumerate(partitions):
        cells = cds.lonlat_to_healpix(Longitude(ra_deg, u.deg), Latitude(dec_deg, u.deg), order)
        found[cells == pixel] = k
    return found


@pytest.fixture(scope="module")
def catalogs_for_lsdb(catalogs, margin, left, tmp_path_factory):
    right_catalog = lsdb.open_catalog(catalogs / CATALOG, margin_cache=margin, columns=["source_id"])
    # the left side partitioned finer than the right (1500 rows per partition at most, vs 3000)
    left_path = write_hats_catalog(
        pa.Table.from_pandas(left, preserve_index=False), tmp_path_factory.mktemp("left") / "left",
        catalog_name="left", max_rows_per_partition=1500,
    )
    left_catalog = lsdb.open_catalog(left_path)
    assert len(left_catalog.get_healpix_pixels()) > len(right_catalog.get_healpix_pixels())
    return left_catalog, right_catalog


def test_lsdb_accepts_our_margin(catalogs_for_lsdb, margin):
    _, right_catalog = catalogs_for_lsdb
    assert right_catalog.margin is not None
    info = right_catalog.margin.hc_structure.catalog_info
    assert info.margin_threshold == THRESHOLD_ARCSEC and info.catalog_type == "margin"


def test_crossmatch_through_the_margin_equals_brute_force(catalogs_for_lsdb, left, right):
    left_catalog, right_catalog = catalogs_for_lsdb
    expected = brute_force_pairs(left, right, THRESHOLD_ARCSEC)
    assert len(expected) >= len(left), "every left point has at least its twin"
    per_left = pd.Series([i for i, _ in expected]).value_counts().max()
    found = crossmatch_pairs(left_catalog, right_catalog, THRESHOLD_ARCSEC, n_neighbors=int(per_left) + 2)
    assert found == expected

    # the test means something: many pairs straddle a partition edge of the right catalog
    partitions = [(p.order, p.pixel) for p in right_catalog.hc_structure.get_healpix_pixels()]
    by_id = right.set_index("source_id")
    pairs = np.array(sorted(expected))
    left_owner = owner(left["ra"].to_numpy()[pairs[:, 0]], left["dec"].to_numpy()[pairs[:, 0]], partitions)
    right_rows = by_id.loc[pairs[:, 1]]
    right_owner = owner(right_rows["ra"].to_numpy(), right_rows["dec"].to_numpy(), partitions)
    # lsdb compares a left row only with the right rows of its own partition and that partition's
    # margin: these pairs were found through our margin
    assert (left_owner != right_owner).sum() >= 20


def test_smaller_radius_is_accepted_and_exact(catalogs_for_lsdb, left, right):
    left_catalog, right_catalog = catalogs_for_lsdb
    expected = brute_force_pairs(left, right, THRESHOLD_ARCSEC / 3)
    assert crossmatch_pairs(left_catalog, right_catalog, THRESHOLD_ARCSEC / 3, n_neighbors=16) == expected


def test_lsdb_refuses_a_radius_larger_than_the_threshold(catalogs_for_lsdb):
    left_catalog, right_catalog = catalogs_for_lsdb
    with pytest.raises(ValueError, match="greater than margin threshold"):
        left_catalog.crossmatch(right_catalog, radius_arcsec=THRESHOLD_ARCSEC * 1.01)

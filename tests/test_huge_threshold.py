"""Issue 13 item 10: a huge threshold is cheap and bounded. Any threshold of 180 degrees or more
means the whole rest of the sky: planning takes well under a second (1e300 used to hang,
1e9 took 4.8 s), every partition reaches every other destination, and a build ends."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import MarginCacheArguments, geometry, pipeline_with_client
from hats_margin.io import TempLayout
from hats_margin.stages import planning

WHOLE_SKY_ARCSEC = 180 * 3600.0


def plan_for(partitions, threshold, fine=True, margin_order=None):
    orders, pixels = geometry.negative_tree([o for o, _ in partitions], [p for _, p in partitions])
    props = TableProperties(catalog_name="x", catalog_type="object", ra_column="ra", dec_column="dec", total_rows=1)
    schema = pa.schema([("_healpix_29", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64())])
    catalog = planning.InputCatalog(UPath("/tmp/x"), props, schema, tuple(partitions),
                                    tuple(zip(orders.tolist(), pixels.tolist())), "_healpix_29", 29, ".parquet")
    args = MarginCacheArguments(input_catalog_path="/tmp/x", output_path="/tmp/y", output_artifact_name="z",
                                margin_threshold=threshold, margin_order=margin_order, fine_filtering=fine,
                                allow_extreme_threshold=True)
    return planning.Plan(args=args, catalog=catalog, margin_order=args.margin_order, threshold_arcsec=threshold,
                         layout=TempLayout(UPath("/tmp/y/z/intermediate")), fingerprint={})


# 256 order-6 partitions in one corner of base pixel 4, 16 order-8 ones beside them
PARTITIONS = [(6, 4 * 4096 + p) for p in range(256)] + [(8, 4 * 65536 + 256 * 16 + p) for p in range(16)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threshold", [1e300, 1e10, 1e9, WHOLE_SKY_ARCSEC])
def test_planning_a_whole_sky_threshold_is_fast_and_reaches_everything(threshold):
    plan = plan_for(PARTITIONS, threshold)
    start = time.perf_counter()
    tasks = planning.make_map_tasks(plan)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"planning took {elapsed:.2f} s"
    n_tiles = len(plan.catalog.partitions) + len(plan.catalog.negative)
    assert all(len(t.dest_orders) == n_tiles - 1 for t in tasks)
    assert max(t.rings for t in tasks) <= max(geometry.whole_sky_rings(o) for o in range(30))


@pytest.mark.parametrize("threshold", [3600.0, 20000.0])
def test_large_thresholds_reach_at_least_the_destinations_of_the_exact_neighbourhood(threshold):
    """Below the whole sky, reachability is searched at a coarser order: a superset of what the
    partition's own order finds (the exact filter then keeps only the rows within the threshold)."""
    plan = plan_for(PARTITIONS, threshold)
    tiling = planning.destinations(plan.catalog)
    start = time.perf_counter()
    reach = planning.reachable_destinations(plan, tiling)
    assert time.perf_counter() - start < 0.5
    for order, pixel in [(6, 4 * 4096), (6, 4 * 4096 + 255), (8, 4 * 65536 + 256 * 16 + 3)]:
        rings = geometry.rings_needed(threshold, order)
        _, nbr = geometry.neighbourhood(np.array([pixel]), order, rings)
        _, tiles = tiling.overlapping(order, nbr)
        direct = set(tiles.tolist()) - {tiling.index_of(order, pixel)}
        assert direct <= set(reach[(order, pixel)].tolist())


def test_rings_are_bounded_by_the_whole_sky():
    for order in (0, 5, 12, 29):
        assert geometry.rings_needed(1e300, order) == geometry.whole_sky_rings(order)
        assert geometry.whole_sky_rings(order) * geometry.ring_reach_arcsec(order) >= WHOLE_SKY_ARCSEC


def test_candidate_pairs_of_a_whole_sky_search_pair_every_row_with_every_destination():
    source = (2, 4 * 16 + 5)
    index = (np.arange(1000, dtype=np.int64) * 7919) % (1 << 54) + (source[1] << 54)
    dests = geometry.Tiling.from_pixels([0, 0, 1], [0, 7, 3])
    rings = geometry.rings_needed(1e300, 2)
    start = time.perf_counter()
    rows, dest_idx = geometry.candidate_pairs(index, 29, *source, 2, rings, dests)
    assert time.perf_counter() - start < 1
    assert len(rows) == 3 * 1000 and np.array_equal(np.bincount(dest_idx), [1000] * 3)


@pytest.mark.timeout(120)
def test_a_build_with_a_huge_threshold_ends_with_every_row_in_every_other_pixel(client, catalogs, tmp_path):
    source = catalogs / "small_sky_object_catalog"
    args = MarginCacheArguments(input_catalog_path=source, output_path=tmp_path, output_artifact_name="sky",
                                margin_threshold=1e300, progress_bar=False, allow_extreme_threshold=True)
    result = pipeline_with_client(args, client)
    total = TableProperties.read_from_dir(source).total_rows
    # one partition: every other pixel of the sky (the negative tree) holds every row
    assert result.pixels and result.total_rows == total * len(result.pixels)
    for leaf in (tmp_path / "sky" / "dataset").glob("Norder=*/Dir=*/Npix=*"):
        assert pq.read_metadata(leaf).num_rows == total

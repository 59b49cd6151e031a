"""Coarse mode reproduces the established importer's margins row for row (per pixel, order-insensitive)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from hats.catalog import TableProperties

from hats_margin import MarginCacheArguments, pipeline_with_client
from helpers import pixel_files, rows_per_pixel

CASES = [
    ("small_sky_object_catalog_3600arcs", "small_sky_object_catalog", 3600),
    ("small_sky_source_catalog_10arcs", "small_sky_source_catalog", 10),
    ("small_sky_source_catalog_180arcs", "small_sky_source_catalog", 180),
    ("small_sky_source_catalog_3600arcs", "small_sky_source_catalog", 3600),
    ("small_sky_source_npix_dir_catalog_180arcs", "small_sky_source_npix_dir_catalog", 180),
    ("small_sky_order1_3600arcs", "small_sky_order1_collection/small_sky_order1", 3600),
]


@pytest.mark.parametrize(("reference", "primary", "threshold"), CASES, ids=[c[0] for c in CASES])
def test_coarse_mode_matches_reference(client, catalogs, reference_margins, tmp_path, reference, primary, threshold):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / primary,
        output_path=tmp_path,
        output_artifact_name=reference,
        margin_threshold=threshold,
        fine_filtering=False,
        progress_bar=False,
    )
    result = pipeline_with_client(args, client)
    ours, theirs = tmp_path / reference, reference_margins / reference

    assert set(pixel_files(ours)) == set(pixel_files(theirs))
    assert rows_per_pixel(ours) == rows_per_pixel(theirs)

    ref_props = TableProperties.read_from_dir(theirs)
    our_props = TableProperties.read_from_dir(ours)
    assert our_props.total_rows == ref_props.total_rows == result.total_rows
    for key in ("catalog_type", "ra_column", "dec_column", "healpix_column", "healpix_order", "npix_suffix"):
        assert getattr(our_props, key) == getattr(ref_props, key), key
    assert our_props.margin_threshold == pytest.approx(ref_props.margin_threshold)
    assert our_props.moc_sky_fraction == pytest.approx(ref_props.moc_sky_fraction)
    assert our_props.hats_order == ref_props.hats_order
    assert (ours / "partition_info.csv").read_text().split() == (theirs / "partition_info.csv").read_text().split()
    # same schema as the primary's _common_metadata, metadata included
    primary_schema = pq.read_schema(catalogs / primary / "dataset" / "_common_metadata")
    assert pq.read_schema(ours / "dataset" / "_common_metadata").equals(primary_schema, check_metadata=True)
    for files in pixel_files(ours).values():
        for file in files:
            assert pq.read_schema(file).equals(primary_schema, check_metadata=True)

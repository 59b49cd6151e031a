"""Tests of the synthetic catalog writer and sky generator (hats_margin.testing.synthetic)."""

from pathlib import Path

import cdshealpix
import hats
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.io.validation import is_valid_catalog
from hats.pixel_math.healpix_pixel_function import sort_pixels
from hats.pixel_math.spatial_index import compute_spatial_index

from hats_margin.testing.synthetic import (
    THREE_PIXEL_VERTICES_DEG,
    points_table,
    realistic_sky,
    spatial_index,
    write_hats_catalog,
)

MAX_ROWS = 400
N_ROWS = 20_000


@pytest.fixture(scope="module")
def sky():
    return realistic_sky(N_ROWS, seed=3)


@pytest.fixture(scope="module")
def catalog_path(sky, tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "sky"
    return write_hats_catalog(
        sky, path, catalog_name="sky", max_rows_per_partition=MAX_ROWS, row_group_size=150
    )


def _partition_files(catalog_path: Path):
    """(HealpixPixel, table) for every partition, read from disk."""
    catalog = hats.read_hats(catalog_path)
    suffix = catalog.catalog_info.npix_suffix
    for pixel in catalog.get_healpix_pixels():
        leaf = catalog_path / "dataset" / f"Norder={pixel.order}" / f"Dir={pixel.dir}" / f"Npix={pixel.pixel}"
        if suffix == "/":
            yield pixel, pq.read_table(leaf)
        else:
            yield pixel, pq.read_table(leaf.with_name(leaf.name + suffix))


def test_catalog_is_strictly_valid(catalog_path):
    assert is_valid_catalog(catalog_path, strict=True)
    catalog = hats.read_hats(catalog_path)
    info = catalog.catalog_info
    assert info.catalog_name == "sky"
    assert info.catalog_type == "object"
    assert info.total_rows == N_ROWS
    assert (info.ra_column, info.dec_column) == ("ra", "dec")
    assert (info.healpix_column, info.healpix_order) == ("_healpix_29", 29)
    assert info.npix_suffix == ".parquet"
    assert (catalog_path / "properties").exists()
    assert len(catalog.get_healpix_pixels()) > 30


def test_rows_preserved_and_schema(catalog_path, sky):
    tables = [table for _, table in _partition_files(catalog_path)]
    combined = pa.concat_tables(tables)
    assert combined.num_rows == N_ROWS
    assert combined.column_names == ["_healpix_29"] + sky.column_names
    assert combined.schema.field("_healpix_29").type == pa.int64()
    assert np.array_equal(np.sort(combined["id"].to_numpy()), np.arange(N_ROWS))
    by_id = combined.sort_by("id").drop_columns(["_healpix_29"])
    assert by_id.equals(sky)
    common = pq.read_schema(catalog_path / "dataset" / "_common_metadata")
    assert common.equals(combined.schema)


def test_rows_in_their_pixel_and_sorted(catalog_path):
    for pixel, table in _partition_files(catalog_path):
        index = table["_healpix_29"].to_numpy()
        assert np.all(index >> (2 * (29 - pixel.order)) == pixel.pixel), pixel
        assert np.all(np.diff(index) >= 0), pixel
        expected = compute_spatial_index(table["ra"].to_numpy(), table["dec"].to_numpy())
        assert np.array_equal(index, expected), pixel


def test_partitioning_is_adaptive_and_minimal(catalog_path, sky):
    everything = spatial_index(sky["ra"].to_numpy(), sky["dec"].to_numpy())
    for pixel, table in _partition_files(catalog_path):
        assert 0 < table.num_rows <= MAX_ROWS
        if pixel.order > 0:
            # the parent had to be split
            parent_rows = np.sum(everything >> (2 * (29 - pixel.order + 1)) == pixel.pixel // 4)
            assert parent_rows > MAX_ROWS, pixel


def test_highest_order_caps_splitting(tmp_path, sky):
    path = write_hats_catalog(
        sky, tmp_path / "capped", catalog_name="capped", max_rows_per_partition=50, highest_order=2
    )
    assert is_valid_catalog(path, strict=True)
    sizes = {pixel: table.num_rows for pixel, table in _partition_files(path)}
    assert max(pixel.order for pixel in sizes) == 2
    assert any(rows > 50 for rows in sizes.values())
    assert all(rows <= 50 for pixel, rows in sizes.items() if pixel.order < 2)
    assert sum(sizes.values()) == N_ROWS


def test_lowest_order(tmp_path):
    table = realistic_sky(2000, seed=0)
    path = write_hats_catalog(
        table, tmp_path / "low", catalog_name="low", max_rows_per_partition=10**6, lowest_order=1
    )
    assert is_valid_catalog(path, strict=True)
    pixels = hats.read_hats(path).get_healpix_pixels()
    assert {pixel.order for pixel in pixels} == {1}
    # one partition per order-1 cell that holds rows, with exactly that cell's rows (hats' index)
    cells = compute_spatial_index(table["ra"].to_numpy(), table["dec"].to_numpy()) >> (2 * (29 - 1))
    expected = {int(cell): int(n) for cell, n in zip(*np.unique(cells, return_counts=True))}
    assert {pixel.pixel: t.num_rows for pixel, t in _partition_files(path)} == expected


def test_metadata_and_partition_info_order(catalog_path):
    catalog = hats.read_hats(catalog_path)
    pixels = list(catalog.get_healpix_pixels())
    assert pixels == list(sort_pixels(pixels))
    lines = (catalog_path / "partition_info.csv").read_text().split()
    assert lines[0] == "Norder,Npix"
    assert [tuple(map(int, line.split(","))) for line in lines[1:]] == [(p.order, p.pixel) for p in pixels]

    metadata = pq.read_metadata(catalog_path / "dataset" / "_metadata")
    assert metadata.num_rows == N_ROWS
    paths = [metadata.row_group(i).column(0).file_path for i in range(metadata.num_row_groups)]
    unique_paths = list(dict.fromkeys(paths))
    expected = [f"Norder={p.order}/Dir={p.dir}/Npix={p.pixel}.parquet" for p in pixels]
    assert unique_paths == expected
    # row groups of row_group_size rows
    for pixel, _ in _partition_files(catalog_path):
        rel = f"Norder={pixel.order}/Dir={pixel.dir}/Npix={pixel.pixel}.parquet"
        file_meta = pq.read_metadata(catalog_path / "dataset" / rel)
        sizes = [file_meta.row_group(i).num_rows for i in range(file_meta.num_row_groups)]
        assert all(size == 150 for size in sizes[:-1]) and 0 < sizes[-1] <= 150
        assert file_meta.row_group(0).sorting_columns[0].column_index == 0


def test_npix_directory_suffix(tmp_path, sky):
    path = write_hats_catalog(
        sky.slice(0, 5000),
        tmp_path / "dirs",
        catalog_name="dirs",
        max_rows_per_partition=500,
        npix_suffix="/",
        catalog_type="source",
    )
    assert is_valid_catalog(path, strict=True)
    catalog = hats.read_hats(path)
    assert catalog.catalog_info.npix_suffix == "/"
    assert catalog.catalog_info.catalog_type == "source"
    total = 0
    for pixel in catalog.get_healpix_pixels():
        leaf = path / "dataset" / f"Norder={pixel.order}" / f"Dir={pixel.dir}" / f"Npix={pixel.pixel}"
        assert leaf.is_dir()
        assert [f.name for f in leaf.iterdir()] == ["part0.parquet"]
        total += pq.read_table(leaf).num_rows
    assert total == 5000


def test_existing_directory_and_bad_arguments(tmp_path):
    table = points_table([10.0, 20.0], [5.0, -5.0])
    path = write_hats_catalog(table, tmp_path / "c", catalog_name="c")
    with pytest.raises(FileExistsError):
        write_hats_catalog(table, path, catalog_name="c")
    write_hats_catalog(points_table([1.0], [1.0]), path, catalog_name="c", overwrite=True)
    assert hats.read_hats(path).catalog_info.total_rows == 1
    with pytest.raises(ValueError, match="highest_order"):
        write_hats_catalog(table, tmp_path / "d", catalog_name="d", lowest_order=3, highest_order=2)
    with pytest.raises(ValueError, match="no rows"):
        write_hats_catalog(table.slice(0, 0), tmp_path / "e", catalog_name="e")
    with pytest.raises(ValueError, match="not in table"):
        write_hats_catalog(table, tmp_path / "f", catalog_name="f", ra_column="RA")
    with pytest.raises(ValueError, match="finite"):
        write_hats_catalog(points_table([np.nan], [0.0]), tmp_path / "g", catalog_name="g")
    assert not (tmp_path / "f").exists()


def test_points_table():
    table = points_table(
        [0.0, 360.0], [90.0, -90.0], mag=np.array([1.5, 2.5], dtype=np.float32), name=["a", "b"]
    )
    assert table.column_names == ["id", "ra", "dec", "mag", "name"]
    assert table["id"].to_pylist() == [0, 1]
    assert table.schema.field("mag").type == pa.float32()
    assert points_table([1.0], [2.0], id=[7])["id"].to_pylist() == [7]
    with pytest.raises(ValueError, match=r"ra and dec must be 1-d and of the same length, got \(2,\) and \(1,\)"):
        points_table([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="mag"):
        points_table([1.0, 2.0], [1.0, 2.0], mag=[1.0])


def test_three_pixel_vertices_are_right():
    lon, lat = cdshealpix.nested.vertices(np.arange(12), 0)
    corners = np.round(np.stack([lon.deg.ravel() % 360.0, lat.deg.ravel()], axis=1), 6)
    unique, counts = np.unique(corners, axis=0, return_counts=True)
    triple = {tuple(point) for point, count in zip(unique, counts) if count == 3}
    assert triple == {(round(ra, 6), round(dec, 6)) for ra, dec in THREE_PIXEL_VERTICES_DEG}


def test_realistic_sky_special_points_and_ranges():
    table = realistic_sky(50_000, seed=11)
    assert table.num_rows == 50_000
    ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
    assert np.all((ra >= 0) & (ra <= 360)) and np.all(np.abs(dec) <= 90)
    assert np.any(dec == 90.0) and np.any(dec == -90.0)
    assert np.sum(np.abs(dec) > 89.99) >= 10
    assert np.any(ra == 0.0) and np.any(ra == 360.0)
    assert np.any((ra > 0) & (ra < 1e-6)) and np.any((ra < 360) & (ra > 360 - 1e-6))
    points = set(zip(ra.tolist(), dec.tolist()))
    for vertex in THREE_PIXEL_VERTICES_DEG:
        assert vertex in points
    # points around each three-pixel vertex land in all three base pixels
    base = spatial_index(ra, dec) >> (2 * 29)
    for vertex_ra, vertex_dec in THREE_PIXEL_VERTICES_DEG:
        dra = np.abs((ra - vertex_ra + 180.0) % 360.0 - 180.0)
        near = (dra < 1e-3) & (np.abs(dec - vertex_dec) < 1e-3)
        assert len(np.unique(base[near])) == 3
    # the band and the clusters make the density far from uniform
    counts = np.bincount(spatial_index(ra, dec) >> (2 * (29 - 3)), minlength=768)
    assert counts.max() > 8 * np.median(counts)
    assert table["id"].to_pylist() == list(range(50_000))
    assert len(set(table["name"].to_pylist())) == 50_000
    assert table["parallax"].null_count > 0
    types = {field.name: field.type for field in table.schema}
    assert types["mag_g"] == pa.float32() and types["flags"] == pa.int32() and types["n_obs"] == pa.int16()
    assert types["is_variable"] == pa.bool_() and types["name"] == pa.string()


def test_realistic_sky_deterministic():
    assert realistic_sky(3000, seed=5).equals(realistic_sky(3000, seed=5))
    assert not realistic_sky(3000, seed=5).equals(realistic_sky(3000, seed=6))
    assert realistic_sky(0).num_rows == 0
    small = realistic_sky(5)
    assert small.num_rows == 5 and small["dec"].to_pylist()[0] == 90.0

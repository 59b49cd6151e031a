"""Bad input gets a clear error before any work starts: one test per kind of bad input.

Each test asserts the error type and that the message names the problem. Checks that need
the disk (the input exists, is a HATS catalog, the output location is usable) happen in
planning, before the output directory or any intermediate file is created: those tests also
assert that nothing was written. Three checks can only happen while reading the data, in the
map tasks (a corrupt or truncated parquet file, rows outside their partition's pixel, a
partition whose schema differs): there the run ends with one StageFailedError naming the file,
before anything that looks like a catalog exists (no hats.properties, not a valid catalog).
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.catalog import TableProperties
from hats.io.validation import is_valid_catalog

from hats_margin import (
    ArgumentError,
    InputCatalogError,
    MarginCacheArguments,
    StageFailedError,
    pipeline_with_client,
)
from helpers import rows_per_pixel, tree_checksum

SOURCE = "small_sky_source_catalog"
PARTITION = Path("dataset", "Norder=2", "Dir=0", "Npix=176.parquet")
OTHER_PARTITION = Path("dataset", "Norder=2", "Dir=0", "Npix=177.parquet")


tree_digest = tree_checksum


def make_args(input_path, output_path, **kwargs) -> MarginCacheArguments:
    values = {
        "input_catalog_path": str(input_path),
        "output_path": str(output_path),
        "output_artifact_name": "margin",
        "margin_threshold": 3600.0,
        "fine_filtering": False,
        "progress_bar": False,
    }
    values.update(kwargs)
    return MarginCacheArguments(**values)


def run_expecting(client, error_type, pattern, input_path, output_path, **kwargs):
    """Run the pipeline, expect ``error_type`` whose message matches ``pattern``; return the error."""
    args = make_args(input_path, output_path, **kwargs)
    with pytest.raises(error_type) as info:
        pipeline_with_client(args, client)
    assert re.search(pattern, str(info.value), re.DOTALL), str(info.value)
    return info.value


def assert_nothing_written(output_path: Path, name: str = "margin"):
    assert not (Path(output_path) / name).exists(), "planning errors must come before any output is written"


def set_property(catalog: Path, key: str, value: str | None):
    """Edit (or with value None, remove) one key in hats.properties and properties."""
    for file in ("hats.properties", "properties"):
        path = catalog / file
        if not path.exists():
            continue
        lines = [line for line in path.read_text().splitlines() if not line.startswith(f"{key}=")]
        if value is not None:
            lines.append(f"{key}={value}")
        path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def source(copy_catalog) -> Path:
    return copy_catalog(SOURCE)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# ----------------------------------------------------------------------------- the input path
def test_input_path_missing(client, tmp_path, out):
    missing = tmp_path / "no_such_catalog"
    run_expecting(client, InputCatalogError, r"no_such_catalog.*does not exist", missing, out)
    assert_nothing_written(out)


def test_input_path_not_a_directory(client, tmp_path, out):
    file = tmp_path / "catalog.parquet"
    file.write_bytes(b"not a directory")
    run_expecting(client, InputCatalogError, r"catalog\.parquet.*is not a directory", file, out)
    assert_nothing_written(out)


def test_input_not_a_hats_catalog(client, tmp_path, out):
    folder = tmp_path / "just_files"
    folder.mkdir()
    (folder / "data.csv").write_text("ra,dec\n1,2\n")
    run_expecting(client, InputCatalogError, r"just_files.*not a HATS catalog.*hats\.properties", folder, out)
    assert_nothing_written(out)


def test_input_is_a_collection(client, copy_catalog, reference_margins, tmp_path):
    """A collection is not bad input: the margin of its primary is built (here the same rows as
    hats-import's coarse 3600 arcsec margin of small_sky_order1)."""
    collection = copy_catalog("small_sky_order1_collection")
    out = tmp_path / "out"
    result = pipeline_with_client(make_args(collection, out), client)
    assert is_valid_catalog(result.catalog_path, strict=True)
    assert rows_per_pixel(result.catalog_path) == rows_per_pixel(reference_margins / "small_sky_order1_3600arcs")
    assert Path(TableProperties.read_from_dir(result.catalog_path).primary_catalog) == collection / "small_sky_order1"


@pytest.mark.parametrize(("inner", "kind"), [("small_sky_order1_margin_1deg", "margin"),
                                             ("small_sky_order1_id_index", "index")])
def test_input_is_a_margin_or_index(client, copy_catalog, out, inner, kind):
    collection = copy_catalog("small_sky_order1_collection")
    run_expecting(
        client, InputCatalogError, rf"{inner} is a '{kind}' catalog; only object and source catalogs take margins",
        collection / inner, out,
    )
    assert_nothing_written(out)


def test_input_is_an_association(client, source, out):
    set_property(source, "dataproduct_type", "association")
    for key, value in {
        "hats_col_assn_primary": "source_id",
        "hats_assn_leaf_files": "true",
        "hats_col_assn_join": "object_id",
        "hats_assn_join_table_url": "small_sky",
        "hats_primary_table_url": "small_sky_source",
    }.items():
        set_property(source, key, value)
    run_expecting(client, InputCatalogError, r"'association' catalog; only object and source", source, out)
    assert_nothing_written(out)


def test_input_is_a_map(client, source, out):
    set_property(source, "dataproduct_type", "map")
    run_expecting(client, InputCatalogError, r"'map' catalog; only object and source", source, out)
    assert_nothing_written(out)


def test_input_without_spatial_index_column(client, source, out):
    schema = pq.read_schema(source / "dataset" / "_common_metadata")
    schema = schema.remove(schema.get_field_index("_healpix_29"))
    pq.write_metadata(schema, source / "dataset" / "_common_metadata")
    (source / "dataset" / "_metadata").unlink()
    set_property(source, "hats_col_healpix", None)
    run_expecting(client, InputCatalogError, r"no spatial index column", source, out)
    assert_nothing_written(out)


def test_partition_listed_but_missing(client, source, out):
    (source / PARTITION).unlink()
    run_expecting(client, InputCatalogError, r"1 partition\(s\) listed .* have no file: .*Npix=176\.parquet", source, out)
    assert_nothing_written(out)


# ------------------------------------------------------------- data problems found by the map tasks
def assert_failed_without_catalog(error: StageFailedError, out: Path, key: str):
    assert error.stage == "mapping"
    assert list(error.failures) == [key], error.failures
    assert "resume" in str(error)
    target = out / "margin"
    assert not (target / "hats.properties").exists()
    assert not is_valid_catalog(target)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet_file_is_named(client, source, out, damage):
    path = source / PARTITION
    data = path.read_bytes()
    path.write_bytes(b"this is not parquet" * 10 if damage == "garbage" else data[: len(data) // 2])
    # both damages destroy the footer: the file cannot be opened (not merely a corrupt row group)
    error = run_expecting(client, StageFailedError,
                          r"2_176: InputCatalogError: partition file \S*Npix=176\.parquet is not a readable parquet file",
                          source, out)
    assert_failed_without_catalog(error, out, "2_176")


def test_rows_outside_their_partition_are_named(client, source, out):
    shutil.copyfile(source / OTHER_PARTITION, source / PARTITION)  # 176's file now holds 177's rows
    error = run_expecting(client, StageFailedError, r"Npix=176\.parquet: \d+ row\(s\) have a spatial index outside "
                          r"partition Norder=2/Npix=176.*mis-partitioned", source, out)
    assert_failed_without_catalog(error, out, "2_176")


@pytest.mark.parametrize("change", ["dropped_column", "changed_type"])
def test_schema_differs_between_partitions(client, source, out, change):
    path = source / PARTITION
    table = pq.read_table(path)
    if change == "dropped_column":
        table = table.drop_columns(["mag"])
    else:
        index = table.schema.get_field_index("mag")
        table = table.set_column(index, "mag", pa.array([f"m{x}" for x in table.column("mag").to_pylist()]))
    pq.write_table(table, path)
    error = run_expecting(client, StageFailedError, r"Npix=176\.parquet.*column 'mag'.*schemas differ", source, out)
    assert_failed_without_catalog(error, out, "2_176")


# --------------------------------------------------------------------------- argument values
@pytest.mark.parametrize("threshold", [0, -5.0, math.nan, math.inf, -math.inf, "10 parsec", "-10arcsec", True])
def test_bad_threshold(tmp_path, threshold):
    with pytest.raises(ArgumentError, match="margin_threshold"):
        make_args(tmp_path / "in", tmp_path / "out", margin_threshold=threshold)


@pytest.mark.parametrize("order", [-2, 30, 100, 2.5, "5"])
def test_margin_order_outside_0_29(tmp_path, order):
    with pytest.raises(ArgumentError, match="margin_order"):
        make_args(tmp_path / "in", tmp_path / "out", margin_order=order, margin_threshold=None)


def test_margin_order_above_spatial_index_order(client, source, out):
    set_property(source, "hats_col_healpix_order", "10")
    run_expecting(client, ArgumentError, r"margin_order=12 is deeper than the catalog's spatial index.*order 10",
                  source, out, margin_order=12, margin_threshold=None)
    assert_nothing_written(out)


@pytest.mark.parametrize("name", ["a/b", "a\\b", "../up", "with space", "", ".", "..", "-dash", "tab\t", "é"])
def test_bad_output_artifact_name(tmp_path, name):
    with pytest.raises(ArgumentError, match="output_artifact_name"):
        make_args(tmp_path / "in", tmp_path / "out", output_artifact_name=name)


def test_output_path_is_a_file(client, source, tmp_path):
    file = tmp_path / "out_file"
    file.write_text("keep me")
    run_expecting(client, ArgumentError, r"output_path .*out_file is a file", source, file)
    assert file.read_text() == "keep me"


def test_output_path_below_a_file(client, source, tmp_path):
    file = tmp_path / "out_file"
    file.write_text("keep me")
    run_expecting(client, ArgumentError, r"output_path .*out_file.* is a file", source, file / "sub")
    assert file.read_text() == "keep me"


def test_output_artifact_is_a_file(client, source, out):
    out.mkdir()
    (out / "margin").write_text("keep me")
    run_expecting(client, ArgumentError, r"the output .*margin \(output_path/output_artifact_name\) is a file",
                  source, out, overwrite=True)
    assert (out / "margin").read_text() == "keep me"


def test_output_equal_to_input(client, source):
    before = tree_digest(source)
    run_expecting(client, ArgumentError, r"is the same directory as the input catalog", source, source.parent,
                  output_artifact_name=source.name, overwrite=True)
    assert tree_digest(source) == before


def test_output_inside_input(client, source):
    before = tree_digest(source)
    run_expecting(client, ArgumentError, r"inside the input catalog", source, source / "dataset")
    assert tree_digest(source) == before


def test_input_inside_output(client, source):
    run_expecting(client, ArgumentError, r"input catalog .* is inside the output directory", source,
                  source.parent.parent, output_artifact_name=source.parent.name, overwrite=True)
    assert (source / "hats.properties").exists()


def test_tmp_dir_inside_input(client, source, out):
    before = tree_digest(source)
    run_expecting(client, ArgumentError, r"tmp_dir .* overlaps the input catalog", source, out,
                  tmp_dir=str(source / "tmp"))
    assert tree_digest(source) == before
    assert_nothing_written(out)


def test_tmp_dir_whose_intermediate_directory_holds_the_input(client, tmp_path, out, copy_catalog):
    """Issue 13 item 1: tmp_dir/<name>/intermediate containing the input is refused too (a fresh
    start would delete it)."""
    source = copy_catalog("small_sky_source_catalog")
    inner = tmp_path / "scratch" / "margin" / "intermediate" / "cat"
    inner.parent.mkdir(parents=True)
    source.rename(inner)
    before = tree_digest(inner)
    run_expecting(client, ArgumentError, r"tmp_dir .* overlaps the input catalog", inner, out,
                  tmp_dir=str(tmp_path / "scratch"), resume=False, overwrite=True)
    assert tree_digest(inner) == before


def test_output_equal_to_input_through_a_link_and_a_relative_path(client, source, tmp_path, monkeypatch):
    """The same directory spelled differently (a symbolic link, a relative path) is the same."""
    before = tree_digest(source)
    (tmp_path / "link").symlink_to(source.parent)
    monkeypatch.chdir(tmp_path)
    run_expecting(client, ArgumentError, r"is the same directory as the input catalog", source, "link",
                  output_artifact_name=source.name, overwrite=True)
    run_expecting(client, ArgumentError, r"is inside the input catalog",
                  os.path.relpath(source, tmp_path), str(source / "dataset" / ".."), overwrite=True)
    assert tree_digest(source) == before


@pytest.mark.parametrize("name", ["dask_n_workers", "dask_threads_per_worker"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "2", None])
def test_bad_worker_counts(tmp_path, name, value):
    with pytest.raises(ArgumentError, match=name):
        make_args(tmp_path / "in", tmp_path / "out", **{name: value})


def test_tmp_dir_not_writable(client, source, tmp_path, out):
    """Tests run as root (chmod does not stop writes): a path below a regular file is never writable."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run_expecting(client, ArgumentError, r"tmp_dir .*a_file.* not a writable directory.*a_file is a file",
                  source, out, tmp_dir=str(blocker / "tmp"))
    assert_nothing_written(out)
    assert blocker.read_text() == "x"


def test_tmp_dir_read_only_mount(client, source, tmp_path, out):
    """A read-only bind mount (when this machine lets us mount) is refused before any work."""
    import subprocess

    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(target), str(target)], check=False,
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=False, capture_output=True)
        try:
            (target / "probe").write_text("x")
            pytest.skip("the bind mount is not read-only on this machine")
        except OSError as exc:
            assert exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        run_expecting(client, ArgumentError, r"tmp_dir .* not a writable directory", source, out, tmp_dir=str(target))
        assert_nothing_written(out)
    finally:
        subprocess.run(["umount", str(target)], check=False)

"""The build's driver reads and writes the catalog-level files without hats (issue 10: start in a
second), in the very bytes and values hats reads and writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.catalog import PartitionInfo, TableProperties
from hats.io.file_io.file_io import get_parquet_write_table_kwargs
from hats.io.validation import is_valid_catalog
from upath import UPath

import hats_margin
from hats_margin import MarginCacheArguments, pipeline
from hats_margin.io import hats_write_kwargs, margin_write_kwargs
from hats_margin.properties import (
    parse_properties,
    plain_margin_is_valid,
    read_catalog_properties,
    read_partitions,
)

HEAVY = ("hats", "mocpy", "matplotlib", "nested_pandas", "tqdm", "astropy")  # tqdm: only with a progress bar


def test_demo_command_never_imports_hats(tmp_path):
    """The whole ``hats-margin demo``, first and repeated (overwrite of its own margin): planning,
    in-process mapping and reducing, finishing. Nor astropy: cdshealpix's core is called
    directly (hats_margin.healpix). Nor pandas, which pyarrow imports on its first conversion to
    or from numpy (~0.4 s): a coarse build and three margins from one read neither."""
    sample = str(Path(hats_margin.__file__).parent / "data" / "small_sky_source_catalog")
    code = textwrap.dedent(f"""
        import sys
        from hats_margin import cli
        first = cli.main(["demo", {str(tmp_path / 'out')!r}, "--no-progress"])
        again = cli.main(["demo", {str(tmp_path / 'out')!r}, "--no-progress"])  # replaces the first one
        coarse = cli.main(["build", {sample!r}, {str(tmp_path / 'coarse')!r}, "--coarse", "--no-progress"])
        three = cli.main(["build", {sample!r}, {str(tmp_path / 'three')!r}, "--no-progress",
                          "--threshold", "5", "--threshold", "10", "--threshold", "60"])
        print(first + again + coarse + three, sorted(m for m in {(*HEAVY, "pandas")!r} if m in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "0 []", run.stdout + run.stderr


def test_verify_command_imports_neither_hats_nor_astropy(tmp_path):
    """``hats-margin verify`` of the demo's margin reads the catalogs with hats-margin's readers
    (nor pandas: the sample has no column whose values verify hashes through pandas)."""
    code = textwrap.dedent(f"""
        import sys
        from hats_margin import cli
        built = cli.main(["demo", {str(tmp_path / 'out')!r}, "--no-progress"])
        for name in {HEAVY!r}:
            sys.modules.pop(name, None)
        checked = cli.main(["verify", {str(tmp_path / 'out' / 'small_sky_source_catalog_10arcs')!r}, "--no-progress"])
        print(built + checked, sorted(m for m in {(*HEAVY, "pandas")!r} if m in sys.modules))
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "0 []", run.stdout + run.stderr


def test_the_verifiers_cell_widths_are_hats_order2mindist():
    from hats.pixel_math.healpix_shim import order2mindist

    from hats_margin.verify.tiles import MIN_CELL_WIDTH_ARCSEC

    for order in range(30):
        assert MIN_CELL_WIDTH_ARCSEC[order] == pytest.approx(float(order2mindist(order)) * 60.0, rel=1e-12)


def _build(catalogs, tmp_path, name, **kwargs):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / "small_sky_source_catalog", output_path=tmp_path, output_artifact_name=name,
        margin_threshold=10, progress_bar=False, **kwargs,
    )
    return pipeline(args).catalog_path


def _hats_rendering(directory) -> str:
    """What hats itself writes for the properties it reads from ``directory``."""
    out = UPath(directory) / "rewritten.properties"
    TableProperties.read_from_dir(UPath(directory)).to_properties_file_path(out, initial_comments="HATS catalog")
    return out.read_text()


def test_margin_properties_are_the_bytes_hats_writes(catalogs, tmp_path):
    path = _build(catalogs, tmp_path, "plain")
    ours = (path / "hats.properties").read_text()
    assert ours == _hats_rendering(path) == (path / "properties").read_text()
    assert is_valid_catalog(path, strict=True)
    assert plain_margin_is_valid(path) is True  # judged without hats; hats agrees
    (path / "hats.properties").write_text(ours.replace("hats_nrows=", "hats_nrows=x"))
    assert plain_margin_is_valid(path) is None  # left to hats, which refuses it
    with pytest.raises(ValueError):
        TableProperties.read_from_dir(path)
    # with extra keys hats writes them (validated and ordered as hats does)
    extra = _build(catalogs, tmp_path, "extra", addl_hats_properties={"hats_cols_default": ["source_ra", "mag"]})
    assert "hats_cols_default=" in (extra / "hats.properties").read_text()
    assert (extra / "hats.properties").read_text() == _hats_rendering(extra)


@pytest.mark.parametrize("name", ["small_sky_object_catalog", "small_sky_source_catalog",
                                  "small_sky_source_npix_dir_catalog"])
def test_own_readers_agree_with_hats(catalogs, name):
    path = UPath(catalogs / name)
    ours, theirs = read_catalog_properties(path), TableProperties.read_from_dir(path)
    for key in ("catalog_name", "total_rows", "ra_column", "dec_column", "healpix_column", "healpix_order",
                "npix_suffix"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.catalog_type == str(theirs.catalog_type)
    expected = [(p.order, p.pixel) for p in PartitionInfo.read_from_dir(path).get_healpix_pixels()]
    assert read_partitions(path) == expected


def test_unusual_properties_are_left_to_hats(tmp_path):
    assert parse_properties("a=1\n# c\nb = x y\n") == {"a": "1", "b": "x y"}
    for text in ("a=x\\\n  y\n", "a: 1\n", "a 1\n"):
        assert parse_properties(text) is None, text
    (tmp_path / "hats.properties").write_text("obs_collection=m\ndataproduct_type=margin\nhats_nrows=1\n")
    with pytest.raises(ValueError):  # hats' own refusal (a margin without its primary) still applies
        read_catalog_properties(UPath(tmp_path))
    (tmp_path / "partition_info.csv").write_text("Norder,Npix\n0,12\n")  # no such order 0 pixel
    assert read_partitions(UPath(tmp_path)) is None


SCHEMAS = {
    "sample": None,
    "nested": pa.schema([
        ("_healpix_29", pa.int64()), ("ra", pa.float64()), ("id", pa.int32()), ("name", pa.string()),
        ("lc", pa.struct([("t", pa.list_(pa.float32())), ("band", pa.string())])),
        ("m", pa.map_(pa.string(), pa.float64())),
    ]),
}
USER = [None, {"compression_level": 15}, {"compression": "snappy"}, {"use_dictionary": False},
        {"use_dictionary": ["name"], "column_encoding": {"id": "DELTA_BINARY_PACKED"}}, {"data_page_size": 4096}]


@pytest.mark.parametrize("schema_name", list(SCHEMAS))
@pytest.mark.parametrize("user", USER)
def test_writer_options_are_hats_defaults(catalogs, schema_name, user):
    schema = SCHEMAS[schema_name] or pq.read_schema(
        catalogs / "small_sky_source_catalog" / "dataset" / "_common_metadata"
    )
    defaults = {"compression": "zstd", "compression_level": 3, "sorting_columns": [pq.SortingColumn(schema.get_field_index("_healpix_29"))]}
    if user and "compression" in user:
        defaults.pop("compression_level")
    merged = defaults | (user or {})
    assert hats_write_kwargs(schema, merged) == get_parquet_write_table_kwargs(schema, write_table_kwargs=merged)
    assert margin_write_kwargs(schema, "_healpix_29", user) == get_parquet_write_table_kwargs(
        schema, write_table_kwargs=merged
    )

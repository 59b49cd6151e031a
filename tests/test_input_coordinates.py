"""Issue 13 item 9: ra/dec that contradict the spatial index never build silently.

The map stage checks the ra/dec of the rows it reads anyway (the candidates) against their
spatial index and refuses a contradiction naming the partition and the row;
``check_input=True`` (CLI ``--check-input``) checks every row. Rows with NaN/inf/null
coordinates are counted, warned about and reported in the result.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hats_margin import MarginCacheArguments, StageFailedError, cli, pipeline_with_client
from hats_margin.checks import TOLERANCE_ARCSEC, check_coordinates

SOURCE = "small_sky_source_catalog"
LEAF = ("dataset", "Norder=2", "Dir=0", "Npix=176.parquet")


def args_for(source, out, **kwargs):
    values = {"input_catalog_path": source, "output_path": out, "output_artifact_name": "m",
              "margin_threshold": 3600.0, "progress_bar": False}
    values.update(kwargs)
    return MarginCacheArguments(**values)


def rewrite(path, column, change):
    table = pq.read_table(path)
    values = np.array(table.column(column).to_pylist(), dtype=object)
    values = change(table, values)
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, column, pa.array(list(values), type=pa.float64())), path)


def central_row(table) -> int:
    """The row deepest inside partition 2_176 (farthest from its edges in order-8 cells, ~14
    arcmin): never a margin candidate at 10 arcsec."""
    from hats_margin import geometry

    cells = table.column("_healpix_29").to_numpy() >> (2 * (29 - 8))
    i, j = geometry.local_xy(cells, 8, 2, 176)
    depth = np.minimum(np.minimum(i, j), np.minimum(63 - i, 63 - j))
    assert depth.max() >= 2
    return int(np.argmax(depth))


# ------------------------------------------------------------------ the pure check
def test_the_fixture_rows_agree_with_their_index(catalogs):
    table = pq.read_table(catalogs / SOURCE / "dataset" / "Norder=2" / "Dir=0" / "Npix=176.parquet")
    result = check_coordinates(table["source_ra"].to_numpy(), table["source_dec"].to_numpy(),
                               table["_healpix_29"].to_numpy(), 29)
    assert len(result.contradicting) == 0 and len(result.non_finite) == 0


def test_the_check_finds_moved_rows_and_counts_rows_without_position(catalogs):
    table = pq.read_table(catalogs / SOURCE / "dataset" / "Norder=2" / "Dir=0" / "Npix=176.parquet")
    ra, dec, index = (table[c].to_numpy().copy() for c in ("source_ra", "source_dec", "_healpix_29"))
    ra[3], ra[5], dec[7] = 400.0, -30.0, 95.0
    ra[11] = np.nan
    dec[13] = np.inf
    ra[17] += 360.0  # the same place: no contradiction
    ra[19] += 0.5 * TOLERANCE_ARCSEC / 3600.0  # rounding, within the tolerance
    result = check_coordinates(ra, dec, index, 29)
    assert result.contradicting.tolist() == [3, 5, 7]
    assert result.non_finite.tolist() == [11, 13]


# ------------------------------------------------------------------ in a build
@pytest.mark.parametrize("fine", [True, False], ids=["exact", "coarse"])
@pytest.mark.parametrize("new_ra", [400.0, -30.0])
def test_ra_contradicting_the_index_is_refused_naming_partition_and_row(client, copy_catalog, tmp_path, fine, new_ra):
    source = copy_catalog(SOURCE)
    rewrite(source.joinpath(*LEAF), "source_ra", lambda t, v: np.where(np.arange(len(v)) % 2 == 0, new_ra, v))
    with pytest.raises(StageFailedError) as info:
        pipeline_with_client(args_for(source, tmp_path, fine_filtering=fine), client)
    message = str(info.value)
    assert "2_176" in message and "Norder=2/Npix=176" in message and "row " in message
    assert "contradict the spatial index" in message
    assert not (tmp_path / "m" / "hats.properties").exists()


def test_ra_column_pointing_at_a_magnitude_is_refused(client, copy_catalog, tmp_path):
    source = copy_catalog(SOURCE)
    for name in ("hats.properties", "properties"):
        path = source / name
        if path.exists():
            path.write_text(path.read_text().replace("hats_col_ra=source_ra", "hats_col_ra=mag"))
    with pytest.raises(StageFailedError, match="mag=.*contradict the spatial index"):
        pipeline_with_client(args_for(source, tmp_path), client)


def test_an_interior_row_is_caught_only_by_the_full_check(client, copy_catalog, tmp_path):
    source = copy_catalog(SOURCE)
    leaf = source.joinpath(*LEAF)
    row = central_row(pq.read_table(leaf))
    rewrite(leaf, "source_ra", lambda t, v: np.where(np.arange(len(v)) == row, 400.0, v))
    result = pipeline_with_client(args_for(source, tmp_path / "default", margin_threshold=10.0), client)
    assert result.total_rows > 0  # the row is not a candidate: not read, not checked
    with pytest.raises(StageFailedError, match=rf"row {row}: source_ra=400\.0"):
        pipeline_with_client(args_for(source, tmp_path / "full", margin_threshold=10.0, check_input=True), client)


def test_rows_without_coordinates_are_counted_and_warned(client, copy_catalog, tmp_path, caplog):
    source = copy_catalog(SOURCE)
    leaf = source.joinpath(*LEAF)
    table = pq.read_table(leaf)
    centre = central_row(table)
    # every fourth row loses its ra (NaN), and the central row its dec (null)
    rewrite(leaf, "source_ra", lambda t, v: np.where(np.arange(len(v)) % 4 == 0, np.nan, v))
    rewrite(leaf, "source_dec", lambda t, v: np.where(np.arange(len(v)) == centre, None, v))
    expected_all = len(range(0, table.num_rows, 4)) + (centre % 4 != 0)
    caplog.set_level(logging.WARNING, logger="hats_margin")
    default = pipeline_with_client(args_for(source, tmp_path / "default", margin_threshold=10.0), client)
    assert 0 < default.rows_without_coordinates < expected_all  # the candidates only
    assert "NaN/inf/null ra or dec (partitions 2_176)" in caplog.text
    assert f"{default.rows_without_coordinates} row(s) with NaN/inf/null ra/dec" in default.summary()
    full = pipeline_with_client(args_for(source, tmp_path / "full", margin_threshold=10.0, check_input=True), client)
    assert full.rows_without_coordinates == expected_all


def test_cli_check_input(capsys, client, copy_catalog, tmp_path):
    source = copy_catalog(SOURCE)
    leaf = source.joinpath(*LEAF)
    row = central_row(pq.read_table(leaf))
    rewrite(leaf, "source_ra", lambda t, v: np.where(np.arange(len(v)) == row, -30.0, v))
    code = cli.main(["build", str(source), str(tmp_path), "--threshold", "10", "--check-input",
                     "--scheduler", client.scheduler.address, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"row {row}" in err and "Npix=176" in err


def test_a_clean_catalog_builds_the_same_with_the_full_check(client, catalogs, tmp_path):
    plain = pipeline_with_client(args_for(catalogs / SOURCE, tmp_path / "a"), client)
    checked = pipeline_with_client(args_for(catalogs / SOURCE, tmp_path / "b", check_input=True), client)
    assert plain.total_rows == checked.total_rows > 0 and checked.rows_without_coordinates == 0

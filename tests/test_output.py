"""What a build writes: a strictly valid HATS margin catalog that hats and lsdb read."""

from __future__ import annotations

import hats
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster, get_task_stream
from hats.catalog import TableProperties
from hats.io.validation import is_valid_catalog

from hats_margin import MarginCacheArguments, pipeline, pipeline_with_client
from hats_margin.stages import reducing
from helpers import pixel_files, rows_per_pixel

SOURCE = "small_sky_source_catalog"


def build(client, catalogs, tmp_path, primary=SOURCE, name="margin", **kwargs):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / primary,
        output_path=tmp_path,
        output_artifact_name=name,
        progress_bar=False,
        **({"margin_threshold": 180.0} | kwargs),
    )
    return pipeline_with_client(args, client), tmp_path / name


@pytest.mark.parametrize("fine_filtering", [True, False], ids=["exact", "coarse"])
def test_output_is_a_strictly_valid_margin_catalog(client, catalogs, tmp_path, fine_filtering):
    result, path = build(client, catalogs, tmp_path, fine_filtering=fine_filtering)
    assert result.total_rows > 0
    assert is_valid_catalog(path, strict=True)
    margin = hats.read_hats(path)
    assert type(margin).__name__ == "MarginCatalog"
    props = margin.catalog_info
    assert props.catalog_type == "margin"
    assert props.total_rows == result.total_rows
    assert props.margin_threshold == 180.0
    assert props.primary_catalog == str(catalogs / SOURCE)  # absolute: catalogs is an absolute path
    assert (props.ra_column, props.dec_column) == ("source_ra", "source_dec")
    assert props.healpix_column == "_healpix_29" and props.healpix_order == 29
    assert props.hats_builder.startswith("hats-margin v")
    assert int(props.hats_order) == max(p.order for p in margin.get_healpix_pixels())
    # no intermediate files left, nothing but the catalog
    assert sorted(p.name for p in path.iterdir()) == ["dataset", "hats.properties", "partition_info.csv", "properties"]
    # _metadata matches the files
    metadata = pq.read_metadata(path / "dataset" / "_metadata")
    assert metadata.num_rows == result.total_rows


def test_primary_catalog_is_recorded_absolute(client, catalogs, tmp_path, monkeypatch):
    """Issue 13 item 13: the primary's path is stored absolute and normalised (it was stored as
    typed, so a relative path resolved differently from another working directory); links are
    kept as the user spelled them."""
    (tmp_path / "cats").symlink_to(catalogs)
    monkeypatch.chdir(tmp_path)
    args = MarginCacheArguments(
        input_catalog_path=f"cats/./{SOURCE}/", output_path="out", output_artifact_name="margin",
        margin_threshold=180.0, progress_bar=False,
    )
    pipeline_with_client(args, client)
    props = TableProperties.read_from_dir(tmp_path / "out" / "margin")
    assert props.primary_catalog == str(tmp_path / "cats" / SOURCE)


def test_margin_pixels_are_partitions_or_negative_tree(client, catalogs, tmp_path):
    _, path = build(client, catalogs, tmp_path, margin_threshold=20000.0)
    primary = hats.read_hats(catalogs / SOURCE)
    allowed = set(primary.get_healpix_pixels()) | set(primary.generate_negative_tree_pixels())
    pixels = set(hats.read_hats(path).get_healpix_pixels())
    assert pixels <= allowed
    assert pixels - set(primary.get_healpix_pixels()), "a wide margin reaches negative-tree pixels too"


def test_rows_are_unchanged_sorted_and_never_in_their_own_partition(client, catalogs, tmp_path):
    _, path = build(client, catalogs, tmp_path, margin_threshold=600.0)
    primary = pq.read_table(catalogs / SOURCE / "dataset").select(
        pq.read_schema(catalogs / SOURCE / "dataset" / "_common_metadata").names
    )
    primary_rows = set(zip(*[primary.column(i).to_pylist() for i in range(primary.num_columns)]))
    for (order, pixel), files in pixel_files(path).items():
        table = pq.read_table(files[0])
        index = table.column("_healpix_29").to_numpy()
        assert np.all(np.diff(index) >= 0), "rows sorted by the spatial index"
        assert not np.any((index >> (2 * (29 - order))) == pixel), "a row is never in its own pixel's margin"
        rows = set(zip(*[table.column(i).to_pylist() for i in range(table.num_columns)]))
        assert rows <= primary_rows, "every margin row is a primary row, unchanged"
        sorting = pq.ParquetFile(files[0]).metadata.row_group(0).sorting_columns
        assert sorting and sorting[0].column_index == table.schema.get_field_index("_healpix_29")


def test_npix_dir_input_and_output(client, catalogs, tmp_path):
    _, plain = build(
        client, catalogs, tmp_path, primary="small_sky_source_npix_dir_catalog", name="plain", fine_filtering=False
    )
    _, dirs = build(
        client, catalogs, tmp_path, primary="small_sky_source_npix_dir_catalog", name="dirs",
        npix_suffix="/", npix_parquet_name="margin.parquet", fine_filtering=False,
    )
    files = pixel_files(dirs)
    assert files and all(len(f) == 1 and f[0].name == "margin.parquet" and f[0].parent.is_dir() for f in files.values())
    assert TableProperties.read_from_dir(dirs).npix_suffix == "/"
    assert rows_per_pixel(dirs) == rows_per_pixel(plain)
    assert is_valid_catalog(dirs, strict=True)
    assert len(hats.read_hats(dirs).get_healpix_pixels()) == len(files)


def test_custom_suffix(client, catalogs, tmp_path):
    _, path = build(client, catalogs, tmp_path, npix_suffix=".pq", fine_filtering=False)
    assert all(f[0].name.endswith(".pq") for f in pixel_files(path).values())
    assert is_valid_catalog(path, strict=True)


def test_empty_margin_is_a_valid_empty_catalog(client, catalogs, tmp_path):
    result, path = build(client, catalogs, tmp_path, primary="small_sky_object_catalog", margin_threshold=10.0)
    assert result.total_rows == 0 and result.pixels == []
    assert is_valid_catalog(path, strict=True)
    props = TableProperties.read_from_dir(path)
    assert props.total_rows == 0 and props.moc_sky_fraction == 0.0 and int(props.hats_order) == 0
    schema = pq.read_schema(catalogs / "small_sky_object_catalog" / "dataset" / "_common_metadata")
    for name in ("_common_metadata", "_metadata"):
        meta = pq.read_metadata(path / "dataset" / name)
        assert meta.num_rows == 0 and meta.num_row_groups == 0
        assert meta.schema.to_arrow_schema().equals(schema)
    assert sorted(p.name for p in (path / "dataset").iterdir()) == ["_common_metadata", "_metadata"]
    assert (path / "partition_info.csv").read_text().strip() == "Norder,Npix"


def test_create_metadata_false(client, catalogs, tmp_path):
    _, path = build(client, catalogs, tmp_path, create_metadata=False)
    assert not (path / "dataset" / "_metadata").exists()
    assert (path / "dataset" / "_common_metadata").exists()


def test_write_table_kwargs_and_addl_properties(client, catalogs, tmp_path):
    _, path = build(
        client, catalogs, tmp_path,
        write_table_kwargs={"compression": "snappy"}, addl_hats_properties={"obs_regime": "Optical"},
    )
    file = next(iter(pixel_files(path).values()))[0]
    assert pq.ParquetFile(file).metadata.row_group(0).column(0).compression == "SNAPPY"
    assert TableProperties.read_from_dir(path).obs_regime == "Optical"


def test_default_compression_is_zstd(client, catalogs, tmp_path):
    _, path = build(client, catalogs, tmp_path)
    file = next(iter(pixel_files(path).values()))[0]
    assert pq.ParquetFile(file).metadata.row_group(0).column(0).compression == "ZSTD"


def test_tmp_dir_holds_intermediates_and_is_cleaned(client, catalogs, tmp_path, monkeypatch):
    tmp = tmp_path / "scratch"
    tmp.mkdir()
    (tmp / "keep.txt").write_text("user file")
    # while reducing, the shards are under tmp_dir, not under the catalog (a tmp_dir that is
    # ignored also ends clean); Dask pickles the spy, so it reports through a file
    seen = tmp_path / "seen.txt"
    real = reducing.reduce_pixel

    def spy(task, *rest):
        in_tmp = sum(1 for _ in (tmp / "margin" / "intermediate").rglob("*.arrow"))
        with open(seen, "a") as handle:
            handle.write(f"{in_tmp} {(tmp_path / 'out' / 'margin' / 'intermediate').exists()}\n")
        return real(task, *rest)

    monkeypatch.setattr(reducing, "reduce_pixel", spy)
    _, path = build(client, catalogs, tmp_path / "out", tmp_dir=tmp)
    assert is_valid_catalog(path, strict=True)
    observed = [line.split() for line in seen.read_text().splitlines()]
    assert observed and all(int(shards) > 0 and inside == "False" for shards, inside in observed), observed
    assert sorted(p.name for p in tmp.iterdir()) == ["keep.txt"]


def test_progress_bars_name_each_stage(client, catalogs, tmp_path, capsys):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / SOURCE, output_path=tmp_path, output_artifact_name="m", margin_threshold=60.0
    )
    pipeline_with_client(args, client)
    err = capsys.readouterr().err
    for stage in ("Planning", "Mapping", "Reducing", "Finishing"):
        assert stage in err
    assert "14/14" in err  # one mapping task per partition


def test_lsdb_opens_primary_with_margin(client, catalogs, tmp_path):
    lsdb = pytest.importorskip("lsdb")
    result, path = build(client, catalogs, tmp_path, margin_threshold=60.0)
    cat = lsdb.open_catalog(catalogs / SOURCE, margin_cache=path)
    assert cat.margin is not None
    assert cat.margin.hc_structure.catalog_info.margin_threshold == 60.0
    assert len(cat.margin.compute()) == result.total_rows


def test_two_worker_processes_give_the_same_output(client, catalogs, tmp_path):
    _, one = build(client, catalogs, tmp_path, name="one", margin_threshold=600.0)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as two_workers,
        get_task_stream(two_workers) as stream,
    ):
        _, two = build(two_workers, catalogs, tmp_path, name="two", margin_threshold=600.0)
    assert len({task["worker"] for task in stream.data}) == 2, "both worker processes take tasks"
    assert rows_per_pixel(one) == rows_per_pixel(two)


def test_pipeline_owns_its_client(catalogs, tmp_path):
    """pipeline() starts a local cluster from the dask_* arguments and shuts it down."""
    args = MarginCacheArguments(
        input_catalog_path=catalogs / SOURCE, output_path=tmp_path, output_artifact_name="own",
        margin_threshold=180.0, progress_bar=False, dask_n_workers=1, dask_tmp=tmp_path / "dask",
    )
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    result = pipeline(args)
    assert result.total_rows > 0 and is_valid_catalog(tmp_path / "own", strict=True)
    assert (tmp_path / "dask" / "dask-scratch-space").is_dir(), "the workers' local directory is dask_tmp"
    # the worker processes are gone (multiprocessing's resource tracker lives as long as we do)
    left = [p for p in me.children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]

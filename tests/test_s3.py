"""Object storage: input and output on a real S3 server (moto in server mode) on loopback."""

from __future__ import annotations

import io

import hats
import lsdb
import pandas as pd
import pytest
from PIL import Image
from upath import UPath

from hats_margin import ArgumentError, MarginCacheArguments, cli, pipeline_with_client
from hats_margin.stages import reducing
from helpers import moto_s3

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "survey"
CATALOG = "small_sky_source_catalog"
THRESHOLD = 10


@pytest.fixture(scope="module")
def s3(catalogs):
    """A moto S3 server with the fixture catalog uploaded; yields its storage options."""
    with moto_s3() as options:
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        fs.put(str(catalogs / CATALOG), f"{BUCKET}/catalogs/{CATALOG}", recursive=True)
        yield options


@pytest.fixture(scope="module")
def local_margin(client, catalogs, tmp_path_factory):
    args = MarginCacheArguments(
        input_catalog_path=catalogs / CATALOG, output_path=tmp_path_factory.mktemp("local"),
        output_artifact_name="margin", margin_threshold=THRESHOLD, progress_bar=False,
    )
    return pipeline_with_client(args, client).catalog_path


def s3_path(options, key: str) -> UPath:
    return UPath(f"s3://{BUCKET}/{key}", **options)


def rows_by_pixel(catalog_path) -> dict:
    """{(order, pixel): the pixel's rows as a sorted DataFrame}, read with hats' own paths."""
    catalog = hats.read_hats(catalog_path)
    result = {}
    for pixel in catalog.get_healpix_pixels():
        path = hats.io.pixel_catalog_file(catalog.catalog_base_dir, pixel)
        with path.open("rb") as handle:
            frame = pd.read_parquet(handle)
        result[(pixel.order, pixel.pixel)] = frame.sort_values(["_healpix_29", "source_id"]).reset_index(drop=True)
    return result


def assert_same_margin(remote, local):
    remote_rows, local_rows = rows_by_pixel(remote), rows_by_pixel(local)
    assert sorted(remote_rows) == sorted(local_rows) and remote_rows
    for pixel, frame in local_rows.items():
        pd.testing.assert_frame_equal(remote_rows[pixel], frame)
    remote_info = hats.read_hats(remote).catalog_info
    assert remote_info.total_rows == hats.read_hats(local).catalog_info.total_rows
    assert remote_info.catalog_type == "margin" and remote_info.margin_threshold == THRESHOLD


def record_shards_while_reducing(monkeypatch, log, count_shards):
    """Patch the reduce task to append ``count_shards()`` to ``log`` each time one starts (Dask
    pickles the task function: a list in its closure would be a copy)."""
    real = reducing.reduce_pixel

    def spy(task, *rest):
        with open(log, "a") as handle:
            handle.write(f"{count_shards()}\n")
        return real(task, *rest)

    monkeypatch.setattr(reducing, "reduce_pixel", spy)


def recorded(log) -> list[int]:
    return [int(n) for n in log.read_text().split()]


def test_s3_to_s3_with_local_intermediate_equals_the_local_build(client, catalogs, s3, local_margin, tmp_path,
                                                                 monkeypatch):
    args = MarginCacheArguments(
        input_catalog_path=s3_path(s3, f"catalogs/{CATALOG}"), output_path=s3_path(s3, "margins"),
        output_artifact_name="margin", margin_threshold=THRESHOLD, tmp_dir=tmp_path / "scratch",
        progress_bar=False,
    )
    scratch = tmp_path / "scratch" / "margin" / "intermediate"
    record_shards_while_reducing(monkeypatch, tmp_path / "shards.txt", lambda: len(list(scratch.rglob("*.arrow"))))
    result = pipeline_with_client(args, client)
    counts = recorded(tmp_path / "shards.txt")
    assert counts and min(counts) > 0, f"the shards were not in the local tmp_dir while reducing: {counts}"
    remote = s3_path(s3, "margins/margin")
    assert str(result.catalog_path) == str(remote)
    assert_same_margin(remote, local_margin)
    assert not s3fs.S3FileSystem(**s3).exists(f"{BUCKET}/margins/margin/intermediate")

    # lsdb reads primary and margin from the bucket
    catalog = lsdb.open_catalog(s3_path(s3, f"catalogs/{CATALOG}"), margin_cache=remote)
    margin = catalog.margin.compute().sort_values("source_id")
    local = lsdb.open_catalog(catalogs / CATALOG, margin_cache=local_margin)
    expected = local.margin.compute().sort_values("source_id")
    assert len(margin) == result.total_rows
    pd.testing.assert_frame_equal(margin, expected)


def test_cli_storage_options_with_intermediate_files_on_s3(capsys, client, s3, local_margin, tmp_path,
                                                           monkeypatch):
    options = [f"--storage-option={key}={value}" for key, value in s3.items()]
    on_s3 = f"{BUCKET}/cli/{CATALOG}_10arcs/intermediate/shards"
    record_shards_while_reducing(
        monkeypatch, tmp_path / "shards.txt",
        lambda: len(s3fs.S3FileSystem(**s3, skip_instance_cache=True).find(on_s3)),
    )
    code = cli.main(
        ["build", f"s3://{BUCKET}/catalogs/{CATALOG}", f"s3://{BUCKET}/cli", "--threshold", str(THRESHOLD),
         "--plot", "--scheduler", client.scheduler.address, "--no-progress", *options]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    counts = recorded(tmp_path / "shards.txt")
    assert counts and min(counts) > 0, f"the shards were not on S3 while reducing: {counts}"
    assert f"s3://{BUCKET}/cli/{CATALOG}_10arcs" in out
    remote = s3_path(s3, f"cli/{CATALOG}_10arcs")
    assert_same_margin(remote, local_margin)
    # the sky map on S3 is a complete image (decodes to the last row) that shows something
    with Image.open(io.BytesIO((remote / "margin_sky_map.png").read_bytes())) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) >= 100
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 2, "a blank image"
    assert not (remote / "intermediate").exists()

    assert cli.main(["info", str(remote), *options]) == 0
    assert "type:          margin" in capsys.readouterr().out


def test_missing_remote_input_is_a_clear_error(capsys, s3):
    options = [f"--storage-option={key}={value}" for key, value in s3.items()]
    code = cli.main(["build", f"s3://{BUCKET}/nothing/here", f"s3://{BUCKET}/out", "--dry-run", *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hats-margin: error: ") and "does not exist" in err


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize(
    ("output_path", "name", "pattern"),
    [
        ("catalogs", CATALOG, "is the same directory as the input catalog"),  # artifact == input
        ("", "catalogs", "input catalog .* is inside the output directory"),  # artifact contains input
        (f"catalogs/{CATALOG}/dataset", "margin", "is inside the input catalog"),  # artifact inside input
        ("catalogs//./x/..", CATALOG, "is the same directory as the input catalog"),  # another spelling
    ],
)
def test_output_overlapping_a_remote_input_is_refused(client, s3, output_path, name, pattern, overwrite):
    """Issue 13 item 1: on S3 an artifact equal to, containing or inside the input was accepted
    (only 'strictly inside' was refused), and --overwrite then deleted the input."""
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    before = sorted(fs.find(f"{BUCKET}/catalogs/{CATALOG}"))
    output = s3_path(s3, output_path) if output_path else UPath(f"s3://{BUCKET}", **s3)
    args = MarginCacheArguments(
        input_catalog_path=s3_path(s3, f"catalogs/{CATALOG}"), output_path=output, output_artifact_name=name,
        margin_threshold=THRESHOLD, overwrite=overwrite, progress_bar=False,
    )
    with pytest.raises(ArgumentError, match=pattern):
        pipeline_with_client(args, client)
    fs.invalidate_cache()
    assert sorted(fs.find(f"{BUCKET}/catalogs/{CATALOG}")) == before


def test_cli_overwrite_of_the_remote_input_is_refused(capsys, s3):
    """The issue's command: the artifact s3://survey/catalogs/<cat> is the input itself."""
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    before = sorted(fs.find(f"{BUCKET}/catalogs/{CATALOG}"))
    options = [f"--storage-option={key}={value}" for key, value in s3.items()]
    code = cli.main(["build", f"s3://{BUCKET}/catalogs/{CATALOG}", f"s3://{BUCKET}/catalogs", "--name", CATALOG,
                     "--overwrite", "--no-progress", *options])
    err = capsys.readouterr().err
    assert code == 2 and "is the same directory as the input catalog" in err, err
    fs.invalidate_cache()
    assert sorted(fs.find(f"{BUCKET}/catalogs/{CATALOG}")) == before


def test_overwrite_on_s3_keeps_the_old_catalog_until_the_new_one_is_complete(client, s3, local_margin, monkeypatch):
    """Issue 13 item 3 on an object store: a failing overwrite leaves the old catalog whole; a
    successful one swaps the new catalog in and leaves no staging directory."""
    from hats_margin.stages import reducing

    def args(threshold, **kwargs):
        return MarginCacheArguments(
            input_catalog_path=s3_path(s3, f"catalogs/{CATALOG}"), output_path=s3_path(s3, "replaced"),
            output_artifact_name="margin", margin_threshold=threshold, progress_bar=False, **kwargs,
        )

    pipeline_with_client(args(5.0), client)
    remote = s3_path(s3, "replaced/margin")
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    old = {path: fs.cat_file(path) for path in fs.find(f"{BUCKET}/replaced/margin")}

    def broken(task, *rest):
        raise RuntimeError("simulated reduce failure")

    with monkeypatch.context() as patch:
        patch.setattr(reducing, "reduce_pixel", broken)
        with pytest.raises(Exception, match="simulated reduce failure"):
            pipeline_with_client(args(THRESHOLD, overwrite=True), client)
    fs.invalidate_cache()
    kept = {path: fs.cat_file(path) for path in fs.find(f"{BUCKET}/replaced/margin")
            if "/.hats-margin" not in path and "/intermediate/" not in path}
    assert kept == old
    assert hats.read_hats(remote).catalog_info.margin_threshold == 5.0
    pipeline_with_client(args(THRESHOLD, overwrite=True), client)
    assert_same_margin(remote, local_margin)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/replaced/margin")) == [
        "dataset", "hats.properties", "partition_info.csv", "properties"]


def test_several_margins_from_one_read_on_s3(client, s3, local_margin):
    """Two margins, input, output and intermediate files all on S3: the one at THRESHOLD is the
    single build's, and no intermediate file is left in either margin."""
    args = MarginCacheArguments(
        input_catalog_path=s3_path(s3, f"catalogs/{CATALOG}"), output_path=s3_path(s3, "many"),
        output_artifact_name=["at_threshold", "wider"], margin_threshold=[THRESHOLD, 10 * THRESHOLD],
        progress_bar=False,
    )
    result = pipeline_with_client(args, client)
    assert [m.margin_threshold for m in result.margins] == [THRESHOLD, 10 * THRESHOLD]
    assert_same_margin(s3_path(s3, "many/at_threshold"), local_margin)
    assert result.margins[1].total_rows > result.margins[0].total_rows
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for name in ("at_threshold", "wider"):
        assert not fs.exists(f"{BUCKET}/many/{name}/intermediate")
        assert fs.exists(f"{BUCKET}/many/{name}/hats.properties")

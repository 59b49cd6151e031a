"""Inputs served over plain HTTP: a real server process on loopback with range requests and no
directory listing (tests/http_server.py). Partitions come from the catalog's partition info
and _metadata, never from listing a directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from upath import UPath

from hats_margin import MarginCacheArguments, cli, pipeline_with_client
from hats_margin.errors import InputCatalogError, StageFailedError
from hats_margin.verify import verify_margin

SOURCE = "small_sky_source_catalog"
NPIX_DIR = "small_sky_source_npix_dir_catalog"
MISSING_FILE = "dataset/Norder=2/Dir=0/Npix=176.parquet"
THRESHOLD = 10


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    """The directory the server serves (tests may add files to it)."""
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="module")
def served(catalogs, www):
    """Copies of the fixture catalogs (one with a partition file deleted, one directory-per-pixel
    catalog without _metadata) behind an HTTP server process; yields the base URL."""
    root = www
    for name in (SOURCE, NPIX_DIR):
        shutil.copytree(catalogs / name, root / name)
    shutil.copytree(catalogs / SOURCE, root / "broken")
    (root / "broken" / MISSING_FILE).unlink()
    shutil.copytree(catalogs / NPIX_DIR, root / "npix_dir_no_metadata")
    (root / "npix_dir_no_metadata" / "dataset" / "_metadata").unlink()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("http_server.py")), str(root)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def build(client, input_path, output: Path):
    args = MarginCacheArguments(
        input_catalog_path=input_path, output_path=output, output_artifact_name="margin",
        margin_threshold=THRESHOLD, progress_bar=False,
    )
    return pipeline_with_client(args, client).catalog_path


def margin_rows(margin: Path) -> dict[str, list]:
    """{file path relative to the margin: its rows}, every margin parquet file."""
    return {
        str(file.relative_to(margin)): pq.read_table(file).to_pylist()
        for file in sorted((margin / "dataset").rglob("Npix=*.parquet"))
    }


def test_the_server_cannot_list_but_serves_ranges(served):
    root = UPath(f"{served}/{SOURCE}")
    assert not root.exists() and not (root / "dataset").is_dir()  # directories are 404
    with (root / MISSING_FILE).open("rb") as handle:
        handle.seek(4)
        assert len(handle.read(100)) == 100


@pytest.mark.parametrize("name", [SOURCE, NPIX_DIR])
def test_a_margin_built_over_http_equals_the_local_one(client, catalogs, served, tmp_path, name):
    remote = build(client, UPath(f"{served}/{name}"), tmp_path / "http")
    local = build(client, catalogs / name, tmp_path / "local")
    assert margin_rows(Path(remote)) == margin_rows(Path(local))
    assert margin_rows(Path(remote))


def test_a_missing_partition_over_http_fails_its_read_naming_the_path(client, served, tmp_path):
    with pytest.raises(StageFailedError) as info:
        build(client, UPath(f"{served}/broken"), tmp_path)
    message = str(info.value)
    assert info.value.failures.keys() == {"2_176"}
    assert f"{served}/broken/{MISSING_FILE} does not exist" in message
    assert not (tmp_path / "margin" / "properties").exists()
    assert not (tmp_path / "margin" / "hats.properties").exists()


def test_a_directory_per_pixel_catalog_without_metadata_is_refused_before_any_work(served, tmp_path):
    with pytest.raises(InputCatalogError, match=r"Npix=.*cannot be listed.*no dataset/_metadata"):
        build(None, UPath(f"{served}/npix_dir_no_metadata"), tmp_path)
    assert not (tmp_path / "margin").exists()


def test_a_catalog_that_is_not_there_says_so(served, tmp_path):
    with pytest.raises(InputCatalogError, match=r"nothing_here is not a HATS catalog.*does not exist"):
        build(None, UPath(f"{served}/nothing_here"), tmp_path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_build_and_info_over_http(capsys, client, served, tmp_path):
    url = f"{served}/{SOURCE}"
    code, out, err = run_cli(capsys, "build", url, tmp_path, "--threshold", THRESHOLD,
                             "--scheduler", client.scheduler.address, "--no-progress")
    assert code == 0, err
    assert (tmp_path / f"{SOURCE}_10arcs" / "hats.properties").exists()
    code, out, err = run_cli(capsys, "info", url)
    assert code == 0, err
    assert "rows:          17161" in out and "partitions:    14" in out
    code, _, err = run_cli(capsys, "info", f"{served}/nothing_here")
    assert code == 2 and "nothing_here is neither a HATS catalog" in err and "does not exist" in err


@pytest.mark.parametrize("name", [SOURCE, NPIX_DIR])
def test_verify_over_http_and_a_margin_file_that_is_404(capsys, client, served, www, name):
    margin_dir = build(client, UPath(f"{served}/{name}"), www / f"margins_{name}")
    margin, primary = UPath(f"{served}/margins_{name}/margin"), UPath(f"{served}/{name}")
    report = verify_margin(margin, primary, client=client)
    assert report.ok and report.rows_expected == report.rows_in_margin > 0, report.summary()
    assert report.structural == []
    code, out, err = run_cli(capsys, "verify", margin, "--primary", primary, "--scheduler", client.scheduler.address)
    assert code == 0 and "result   OK" in out, out + err
    lost = min((Path(margin_dir) / "dataset").rglob("Npix=*.parquet"))
    lost.unlink()
    report = verify_margin(margin, primary)
    relative = lost.relative_to(margin_dir).as_posix()
    assert not report.ok and report.missing > 0
    assert any(f"{margin}/{relative}: not a readable parquet file" in s for s in report.structural), report.summary()


def test_verify_against_a_primary_missing_a_partition_over_http_names_it(client, catalogs, served, tmp_path):
    margin = build(client, catalogs / SOURCE, tmp_path)
    with pytest.raises(StageFailedError) as info:
        verify_margin(margin, UPath(f"{served}/broken"), client=client)
    assert f"primary partition file {served}/broken/{MISSING_FILE} does not exist" in str(info.value)
    with pytest.raises(InputCatalogError, match=f"primary partition file {served}/broken/{MISSING_FILE} does not"):
        verify_margin(margin, UPath(f"{served}/broken"))

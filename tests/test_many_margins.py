"""Several margins from one read (issue 12, section 2): each is the catalog a single-threshold build
writes, row for row and in its properties; every partition is read once; resume, fingerprint and
collections work per run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.catalog import TableProperties
from upath import UPath

from hats_margin import MarginCacheArguments, cli, pipeline_with_client, runner
from hats_margin.errors import ArgumentError, ResumeMismatchError
from hats_margin.pixel import Pixel
from hats_margin.stages import mapping
from hats_margin.verify import verify_margin
from helpers import pixel_files

SOURCE = "small_sky_source_catalog"
THRESHOLDS = [10, 600, 1800]  # arcsec: rows in every margin of the 17k-row sample
NAMES = ["m10", "m600", "m1800"]
# properties that name the run, not the margin's content
_RUN_KEYS = {"hats_creation_date", "hats_builder"}


def _args(input_path, output, threshold, name, **kw) -> MarginCacheArguments:
    return MarginCacheArguments(
        input_catalog_path=input_path, output_path=output, output_artifact_name=name,
        margin_threshold=threshold, progress_bar=False, **kw,
    )


def _properties(catalog: Path) -> dict:
    values = TableProperties.read_from_dir(catalog).explicit_dict()
    return {k: v for k, v in values.items() if k not in _RUN_KEYS}


def _files(catalog: Path) -> dict[tuple[int, int], list]:
    """Rows of every pixel file, in file order (row for row, not as sets)."""
    return {pixel: pq.read_table(files[0]).to_pylist() for pixel, files in pixel_files(catalog).items()}


@pytest.fixture(scope="module")
def singles(client, catalogs, tmp_path_factory) -> Path:
    """One single-threshold build per threshold, the reference."""
    out = tmp_path_factory.mktemp("singles")
    for threshold, name in zip(THRESHOLDS, NAMES):
        pipeline_with_client(_args(catalogs / SOURCE, out, threshold, name), client)
    return out


@pytest.mark.parametrize("batch", [None, 5], ids=["default-batches", "batches-of-5"])
def test_three_margins_equal_three_single_builds_row_for_row_and_pass_verify(
    client, catalogs, singles, tmp_path, monkeypatch, batch
):
    if batch:  # several map tasks (and margins) in one shard; the single builds are batched otherwise
        monkeypatch.setattr(runner, "batch_size", lambda n_tasks, threads: batch)
    reads = []
    real = mapping.open_parquet
    monkeypatch.setattr(mapping, "open_parquet", lambda path: reads.append(str(path)) or real(path))
    args = _args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES)
    result = pipeline_with_client(args, client)
    assert [m.catalog_path.name for m in result.margins] == NAMES
    # every partition file read once, whatever the number of thresholds
    leaves = {str(f) for files in pixel_files(catalogs / SOURCE).values() for f in files}
    assert sorted(reads) == sorted(leaves)
    for name in NAMES:
        built, single = tmp_path / name, singles / name
        rows = _files(built)
        assert rows == _files(single), name
        assert sum(len(r) for r in rows.values()) > 0
        assert _properties(built) == _properties(single), name
        assert (built / "partition_info.csv").read_text() == (single / "partition_info.csv").read_text()
        report = verify_margin(built, catalogs / SOURCE)
        assert report.ok, report
        assert not (built / "intermediate").exists()
        assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in single.iterdir())
    counts = [m.total_rows for m in result.margins]
    assert counts == sorted(counts) and len(set(counts)) == 3  # nested, and different


def test_default_names_from_a_base_name_and_the_command_line(capsys, client, catalogs, singles, tmp_path):
    args = _args(catalogs / SOURCE, tmp_path, ["10arcsec", "10arcmin"], "sky")
    assert [m.output_artifact_name for m in args.margins] == ["sky_10arcs", "sky_10arcmin"]
    code = cli.main(
        ["build", str(catalogs / SOURCE), str(tmp_path), "--threshold", "10", "--threshold", "600",
         "--threshold", "30arcmin", "--no-progress"]
    )
    assert code == 0
    names = ["small_sky_source_catalog_10arcs", "small_sky_source_catalog_10arcmin",
             "small_sky_source_catalog_30arcmin"]
    for name, single in zip(names, NAMES):
        assert _files(tmp_path / name) == _files(singles / single)
    out = capsys.readouterr().out
    assert all(name in out for name in names)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"margin_threshold": [5, 5.0]}, "more than once"),
        ({"margin_threshold": [5, 10], "output_artifact_name": ["a"]}, "1 names for 2"),
        ({"margin_threshold": [5, 10], "output_artifact_name": ["a", "a"]}, "same name"),
        ({"margin_threshold": [5, 10], "fine_filtering": False}, "fine_filtering=False"),
        ({"margin_threshold": []}, "empty list"),
        ({"margin_threshold": [5, "10 parsecs"]}, "10 parsecs"),
        ({"margin_threshold": list(range(1, 66))}, "65 widths: one read builds at most 64"),
    ],
)
def test_bad_lists_of_thresholds_are_refused_naming_the_value(kwargs, words):
    values = {"input_catalog_path": "in", "output_path": "out", "output_artifact_name": "m", **kwargs}
    with pytest.raises(ArgumentError, match=words):
        MarginCacheArguments(**values)


def test_a_list_of_one_threshold_is_the_single_build():
    args = MarginCacheArguments(input_catalog_path="in", output_path="out", output_artifact_name=["m"],
                                margin_threshold=["10arcsec"])
    assert (args.margins, args.margin_threshold, args.output_artifact_name) == ((), 10.0, "m")


def test_a_killed_run_resumes_and_a_changed_set_is_refused(client, catalogs, singles, tmp_path, monkeypatch):
    real = mapping.map_partition

    def dies_on_the_fifth(task, *args):
        if task.key == "2_180":
            raise RuntimeError("killed")
        return real(task, *args)

    monkeypatch.setattr(mapping, "map_partition", dies_on_the_fifth)
    args = _args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES)
    with pytest.raises(Exception, match="killed"):
        pipeline_with_client(args, client)
    for name in NAMES:
        assert not (tmp_path / name / "hats.properties").exists()
    changed = _args(catalogs / SOURCE, tmp_path, THRESHOLDS[:2] + [1200], NAMES)
    with pytest.raises(ResumeMismatchError, match="run_margins"):
        pipeline_with_client(changed, client)
    monkeypatch.setattr(mapping, "map_partition", real)
    result = pipeline_with_client(args, client)
    assert result.margins[0].skipped_tasks["mapping"] == 13  # every task but the killed one
    for name in NAMES:
        assert _files(tmp_path / name) == _files(singles / name)
        assert not (tmp_path / name / "intermediate").exists()


def test_a_run_killed_while_finishing_completes_every_margin(client, catalogs, singles, tmp_path, monkeypatch):
    from hats_margin.stages import finishing

    real = finishing.clean_up
    monkeypatch.setattr(finishing, "clean_up", lambda plan: (_ for _ in ()).throw(RuntimeError("killed")))
    args = _args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES)
    with pytest.raises(Exception, match="killed"):
        pipeline_with_client(args, client)
    monkeypatch.setattr(finishing, "clean_up", real)
    result = pipeline_with_client(args, client)
    assert [m.total_rows for m in result.margins] == [
        int(TableProperties.read_from_dir(singles / n).total_rows) for n in NAMES
    ]
    for name in NAMES:
        assert _files(tmp_path / name) == _files(singles / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
            p.name for p in (singles / name).iterdir()
        )


def test_overwrite_replaces_each_margin(client, catalogs, singles, tmp_path):
    for name in NAMES:
        shutil.copytree(singles / "m10", tmp_path / name)  # a valid catalog everywhere
    args = _args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES)
    with pytest.raises(Exception, match="overwrite"):
        pipeline_with_client(args, client)
    pipeline_with_client(_args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES, overwrite=True), client)
    for name in NAMES:
        assert _files(tmp_path / name) == _files(singles / name)


def test_every_margin_is_registered_in_the_collection(client, copy_catalog):
    from hats.catalog.dataset.collection_properties import CollectionProperties

    collection = copy_catalog("small_sky_order1_collection")
    args = _args(collection, collection, [60, 600], ["c60", "c600"])
    pipeline_with_client(args, client)
    props = CollectionProperties.read_from_dir(collection)
    assert {"c60", "c600"} <= set(props.all_margins)


@pytest.fixture(scope="module")
def served(catalogs, tmp_path_factory):
    """The sample catalog behind a real HTTP server process (range requests, no listing)."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(catalogs / SOURCE, root / SOURCE)
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("http_server.py")), str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/{SOURCE}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_three_margins_of_a_catalog_served_over_http_equal_the_single_builds(client, catalogs, singles, served, tmp_path):
    flags = [word for t, n in zip(THRESHOLDS, NAMES) for word in ("--threshold", str(t), "--name", n)]
    code = cli.main(["build", served, str(tmp_path), "--no-progress", *flags])
    assert code == 0
    for name in NAMES:
        assert _files(tmp_path / name) == _files(singles / name)
        assert _properties(tmp_path / name) == {**_properties(singles / name), "primary_catalog": served}
        report = verify_margin(tmp_path / name, UPath(served), client=client)
        assert report.ok, report


def test_command_line_dry_run_and_coarse_refusal(capsys, catalogs, tmp_path):
    argv = ["build", str(catalogs / SOURCE), str(tmp_path), "--threshold", "10", "--threshold", "600"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "threshold 10 arcsec" in out and "threshold 600 arcsec" in out
    assert not any(tmp_path.iterdir())  # wrote nothing
    assert cli.main([*argv, "--coarse"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hats-margin: error: several --threshold values need exact margins: --coarse")
    assert len(err.strip().splitlines()) == 1
    assert cli.main([*argv, "--name", "a", "--name", "b", "--name", "c"]) == 2
    assert "--name given 3 times for 2 --threshold values" in capsys.readouterr().err


def test_a_run_killed_while_reducing_resumes_only_the_missing_pixels(client, catalogs, singles, tmp_path, monkeypatch):
    from hats_margin.stages import reducing

    real = reducing.reduce_pixel

    def largest_margin_fails(task, *rest):
        if task.key.startswith("0:"):  # margin 0: the largest threshold
            raise RuntimeError("killed")
        return real(task, *rest)

    monkeypatch.setattr(reducing, "reduce_pixel", largest_margin_fails)
    args = _args(catalogs / SOURCE, tmp_path, THRESHOLDS, NAMES)
    with pytest.raises(Exception, match="reducing"):
        pipeline_with_client(args, client)
    monkeypatch.setattr(reducing, "reduce_pixel", real)
    result = pipeline_with_client(args, client)
    smaller = sum(len(pixel_files(singles / name)) for name in NAMES[:2])
    assert result.margins[0].skipped_tasks == {"mapping": 14, "reducing": smaller}
    for name in NAMES:
        assert _files(tmp_path / name) == _files(singles / name)


def test_the_shards_hold_each_row_once_marked_with_its_margins(catalogs, tmp_path):
    """One read writes each margin row once per destination, with the margins it is in (the shard's
    last column), not once per margin; the rows each margin gets are those its marker counts, and
    those a single-threshold map sends to the destination, in the same order."""
    from pyarrow import ipc

    from hats_margin import resume
    from hats_margin.io import MARGINS_COLUMN
    from hats_margin.pixel import margin_key
    from hats_margin.stages import planning

    def mapped(args):
        plans = planning.make_plans(args) if args.margins else [planning.make_plan(args)]
        starts = [resume.start(p) for p in plans]
        lead = next(p for p in plans if not p.margin_index)
        payloads = {}
        for task in lead.map_tasks:
            for key, (ok, payload) in mapping.map_batch([task]).items():
                assert ok, payload
                payloads[key] = payload
        rows = {}  # (source, destination) -> the rows sent, as read from the shard
        for payload in payloads.values():
            if not payload["batches"]:  # sent no row: no shard written
                continue
            with ipc.open_file(str(lead.layout.shard(payload["shard"]).path)) as shard:
                for dest, batches in payload["batches"].items():
                    table = pa.Table.from_batches([shard.get_batch(i) for i in batches], schema=shard.schema)
                    rows[(tuple(payload["source"]), dest)] = table
        for start in starts:
            start.lock.release()
        return payloads, rows

    several, shard_rows = mapped(_args(catalogs / SOURCE, tmp_path / "several", THRESHOLDS, NAMES))
    largest_first = sorted(THRESHOLDS, reverse=True)
    sent = {t: 0 for t in THRESHOLDS}
    for (source, dest), table in shard_rows.items():
        assert table.schema.names[-1] == MARGINS_COLUMN and table.schema.field(MARGINS_COLUMN).type == pa.uint8()
        bits = table[MARGINS_COLUMN].to_pylist()
        assert all(bits), "every row sent is in some margin"
        payload = several["_".join(map(str, source))]
        for index, threshold in enumerate(largest_first):
            n = sum(b >> index & 1 for b in bits)
            assert payload["rows"].get(f"{index}:{dest}", 0) == n
            sent[threshold] += n
    total = sum(t.num_rows for t in shard_rows.values())
    assert total == sent[max(THRESHOLDS)] < sum(sent.values()), "each row once, not once per margin"
    for threshold in THRESHOLDS:  # a margin's rows are a single build's, in its order
        index = largest_first.index(threshold)
        _, single_rows = mapped(_args(catalogs / SOURCE, tmp_path / f"single{threshold}", threshold, "m"))
        for (source, dest), table in single_rows.items():
            mine = shard_rows[(source, margin_key(Pixel.parse(dest)))]
            keep = pa.array([bool(b >> index & 1) for b in mine[MARGINS_COLUMN].to_pylist()])
            assert mine.filter(keep).drop_columns([MARGINS_COLUMN]).equals(table), (threshold, source, dest)
        assert sum(t.num_rows for t in single_rows.values()) == sent[threshold]


@pytest.mark.parametrize("margins", [2, 8, 9, 33, 64])
def test_each_row_carries_exactly_the_margins_it_is_in(margins):
    """The bits the map stage writes per row (up to 64 margins, in the smallest integer type) give
    back each margin's rows, in their order, whatever the pattern (nested or not)."""
    from hats_margin.io import MARGINS_COLUMN, margin_bits_type, rows_of_margin

    rng = np.random.default_rng(margins)
    inside = rng.random((margins, 200)) < 0.4
    inside[:, 0] = True  # a row in every margin (the top bit included)
    bits = mapping._margin_bits(inside)
    assert pa.array(bits).type == margin_bits_type(margins)
    assert margin_bits_type(margins).bit_width == next(w for w in (8, 16, 32, 64) if margins <= w)
    table = pa.table({"_healpix_29": np.arange(200), MARGINS_COLUMN: bits})
    for margin in range(margins):
        rows = rows_of_margin(table, margin)
        assert rows.column_names == ["_healpix_29"]
        assert rows["_healpix_29"].to_pylist() == np.flatnonzero(inside[margin]).tolist()

"""The intermediate files cost per map task, not per (source, destination) pair.

One shard file per map task holds the rows of every destination, grouped in record batches; the
task's done marker indexes them and a reduce task reads only its own batches. Each row group's
columns are decoded at most once, small row groups in a single read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hats.io.validation import is_valid_catalog
from upath import UPath

from hats_margin import MarginCacheArguments, ResumeMismatchError, StageFailedError, pipeline_with_client
from hats_margin import io as hm_io
from hats_margin.io import ShardWriters, TempLayout, read_shard
from hats_margin.stages import mapping, reducing
from hats_margin.testing.synthetic import points_table, write_hats_catalog
from helpers import rows_per_pixel

NAME = "margin"


def make_args(source, root: Path, **kwargs) -> MarginCacheArguments:
    values = {
        "input_catalog_path": str(source),
        "output_path": str(root / "out"),
        "output_artifact_name": NAME,
        "margin_threshold": 3600.0,
        "fine_filtering": True,
        "progress_bar": False,
        "tmp_dir": str(root / "tmp"),
    }
    values.update(kwargs)
    return MarginCacheArguments(**values)


def map_only(client, args, monkeypatch) -> Path:
    """Run the map stage (every reduce task fails); returns the intermediate directory."""
    with monkeypatch.context() as patch:
        patch.setattr(reducing, "reduce_pixel", lambda task: (_ for _ in ()).throw(RuntimeError("stop")))
        with pytest.raises(StageFailedError, match="reducing"):
            pipeline_with_client(args, client)
    return Path(args.tmp_dir) / NAME / "intermediate"


def test_one_shard_file_per_map_task(client, copy_catalog, tmp_path, monkeypatch):
    source = copy_catalog("small_sky_source_catalog")
    base = map_only(client, make_args(source, tmp_path), monkeypatch)
    markers = [json.loads(p.read_text()) for p in sorted((base / "mapping").glob("*.json"))]
    pairs = sum(1 for m in markers for n in m["rows"].values() if n)
    sending = sum(1 for m in markers if any(m["rows"].values()))
    shards = sorted(p for p in (base / "shards").rglob("*") if p.is_file())
    assert len(markers) == 14
    assert pairs > 2 * len(markers), "the sample should send rows to several destinations per partition"
    assert len(shards) == sending <= len(markers)
    # every intermediate file: run.json, one marker and at most one shard per map task
    assert sum(1 for p in base.rglob("*") if p.is_file()) <= 1 + 2 * len(markers)
    for marker in markers:
        assert set(marker["batches"]) == {k for k, n in marker["rows"].items() if n}


def test_reduce_reads_only_its_batches(tmp_path):
    layout = TempLayout(UPath(tmp_path))
    layout.make_dirs()
    schema = pa.schema([("_healpix_29", pa.int64()), ("name", pa.string())])
    writers = ShardWriters(layout, 2, 5, schema, flush_bytes=200)  # several flushes
    sent: dict[tuple[int, int], list[int]] = {}
    rng = np.random.default_rng(1)
    for step in range(40):
        dest = [(1, 3), (2, 4), (3, 77)][int(rng.integers(3))]
        values = rng.integers(0, 1 << 40, int(rng.integers(1, 6)))
        sent.setdefault(dest, []).extend(values.tolist())
        writers.write(dest, pa.table({"_healpix_29": values, "name": [f"r{step}"] * len(values)}, schema=schema))
    writers.close()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["2_5.arrow"]
    batches = [b for dest in writers.index for b in writers.index[dest]]
    assert sorted(batches) == list(range(len(batches))) and len(batches) > 3
    for dest, values in sent.items():
        table = read_shard(layout.shard(2, 5), writers.index[dest])
        assert table.column("_healpix_29").to_pylist() == values
        assert writers.rows[dest] == len(values)


def test_failed_map_task_leaves_no_marker_and_resumes(client, copy_catalog, tmp_path, monkeypatch):
    """A shard write that fails mid-task: no marker, and the re-run rewrites that task's shard."""
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    real = ShardWriters._write_pending

    def failing(self):
        real(self)  # the batches reach the file, then the task fails before its footer and marker
        if self.path.name == "2_180.arrow":
            raise OSError("simulated write failure")

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriters, "_write_pending", failing)
        with pytest.raises(StageFailedError, match="mapping"):
            pipeline_with_client(args, client)
    base = Path(args.tmp_dir) / NAME / "intermediate"
    assert (base / "shards" / "2_180.arrow").exists() and not (base / "mapping" / "2_180.json").exists()
    result = pipeline_with_client(args, client)
    assert result.skipped_tasks["mapping"] == 13
    fresh = pipeline_with_client(make_args(source, tmp_path / "fresh"), client)
    assert result.total_rows == fresh.total_rows
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "fresh" / "out" / NAME)
    assert is_valid_catalog(str(tmp_path / "out" / NAME), strict=True)


def test_reduce_tasks_write_no_marker_files(client, copy_catalog, tmp_path, monkeypatch):
    """A published margin file is its reduce task's done marker: just before the clean-up the
    intermediate directory holds run.json, one marker per map task and its shard, nothing per pixel."""
    from hats_margin.stages import finishing

    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    base = Path(args.tmp_dir) / NAME / "intermediate"
    seen = {}
    real = finishing.clean_up

    def spy(plan):
        seen["files"] = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
        real(plan)

    monkeypatch.setattr(finishing, "clean_up", spy)
    reads = []
    real_read = finishing.read_footer
    monkeypatch.setattr(finishing, "read_footer", lambda path: reads.append(path) or real_read(path))
    result = pipeline_with_client(args, client)
    assert reads == [], "_metadata comes from the footers the reduce tasks returned, no file is read back"
    files = seen["files"]
    assert len(result.pixels) >= 10, "the sample should have many margin pixels"
    assert not [f for f in files if f.startswith("reducing")], files
    shards = [f for f in files if f.startswith("shards/")]
    assert len([f for f in files if f.startswith("mapping/")]) == 14
    assert len(files) == 1 + 14 + len(shards)


def test_resume_skips_published_pixels_and_redoes_short_ones(client, copy_catalog, tmp_path, monkeypatch):
    """A re-run redoes exactly the pixels whose file is missing or does not hold the rows the map
    stage sent it (here: failed tasks, and one published file replaced by a shorter one)."""
    import pyarrow.parquet as pq

    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    flag = tmp_path / "failed.txt"
    real = reducing.reduce_pixel

    def half_fail(task):
        if task.pixel[1] % 2:
            with open(flag, "a") as handle:  # Dask may pickle this function by value: report via a file
                handle.write(f"{task.key}\n")
            raise RuntimeError("simulated reduce failure")
        return real(task)

    with monkeypatch.context() as patch:
        patch.setattr(reducing, "reduce_pixel", half_fail)
        with pytest.raises(StageFailedError, match="reducing"):
            pipeline_with_client(args, client)
    failed = set(flag.read_text().split())
    published = sorted((tmp_path / "out" / NAME / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    assert failed and len(published) > 2
    short = published[0]
    table = pq.read_table(short)
    assert table.num_rows > 1, "pick a pixel with several rows"
    pq.write_table(table.slice(1), short)
    from hats_margin.stages import finishing

    reads = []
    real_read = finishing.read_footer
    monkeypatch.setattr(finishing, "read_footer", lambda path: reads.append(Path(path.path)) or real_read(path))
    result = pipeline_with_client(args, client)
    assert result.skipped_tasks["reducing"] == len(published) - 1
    assert sorted(reads) == published[1:], "finishing reads back only the files an earlier run published"
    assert len(result.pixels) == len(published) + len(failed)
    pipeline_with_client(make_args(source, tmp_path / "fresh"), client)
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "fresh" / "out" / NAME)
    assert is_valid_catalog(str(tmp_path / "out" / NAME), strict=True)


def test_intermediate_files_of_another_layout_are_never_resumed(client, copy_catalog, tmp_path, monkeypatch):
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    base = map_only(client, args, monkeypatch)
    run = json.loads((base / "run.json").read_text())
    run["fingerprint"]["intermediate_format"] = 1
    (base / "run.json").write_text(json.dumps(run))
    with pytest.raises(ResumeMismatchError, match="intermediate_format"):
        pipeline_with_client(args, client)


@pytest.fixture
def wide_row_groups(tmp_path) -> Path:
    """A 3-partition catalog with several row groups per partition, below and above the size
    under which a row group is read whole."""
    rng = np.random.default_rng(3)
    n = 30_000
    ra, dec = rng.uniform(45, 46, n), rng.uniform(0, 1, n)
    extra = {f"c{i}": rng.normal(size=n) for i in range(12)}
    path = tmp_path / "wide"
    write_hats_catalog(
        points_table(ra, dec, **extra), path, catalog_name="wide", max_rows_per_partition=12_000,
        row_group_size=2_000,
    )
    return path


@pytest.mark.parametrize("small_bytes", [1 << 30, 0], ids=["read-whole", "index-first"])
def test_each_column_of_a_row_group_is_decoded_once(client, wide_row_groups, tmp_path, monkeypatch, small_bytes):
    reads: dict[tuple[str, int], list[str]] = {}
    real = hm_io.read_row_group

    def counting(file, path, index, columns=None, use_threads=True):
        table = real(file, path, index, columns, use_threads)
        reads.setdefault((str(path), index), []).extend(table.column_names)
        return table

    monkeypatch.setattr(mapping, "read_row_group", counting)
    monkeypatch.setattr(mapping, "SMALL_ROW_GROUP_BYTES", small_bytes)
    args = make_args(wide_row_groups, tmp_path, margin_threshold=5.0)
    with_index = pipeline_with_client(args, client)
    assert with_index.total_rows > 0
    assert len(reads) > 10
    for columns in reads.values():
        assert len(columns) == len(set(columns)), "a column was decoded twice"
    if small_bytes:
        assert all(len(columns) == 16 for columns in reads.values())  # one read of every column
    else:
        assert any(len(columns) == 3 for columns in reads.values()), "no row group skipped its other columns"
    monkeypatch.undo()
    reference = pipeline_with_client(make_args(wide_row_groups, tmp_path / "ref", margin_threshold=5.0), client)
    assert reference.total_rows == with_index.total_rows
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "ref" / "out" / NAME)

"""The intermediate files cost per batch of map tasks, not per map task nor per (source,
destination) pair.

One shard file per batch of map tasks holds the rows of every task and destination, grouped in
record batches; the batch's done marker indexes them per task and a reduce task reads only its
own batches. Each row group's
columns are decoded at most once, small row groups in a single read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hats.io.validation import is_valid_catalog
from upath import UPath

from hats_margin import (
    MarginCacheArguments,
    ResumeMismatchError,
    StageFailedError,
    pipeline_with_client,
    runner,
)
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
        patch.setattr(reducing, "reduce_pixel", lambda task, *rest: (_ for _ in ()).throw(RuntimeError("stop")))
        with pytest.raises(StageFailedError, match="reducing"):
            pipeline_with_client(args, client)
    return Path(args.tmp_dir) / NAME / "intermediate"


def batches_of(size):
    """Patch the runner to send the map tasks in batches of ``size`` (whatever the threads)."""
    return lambda n_tasks, threads: size


def rerun_redoes_only(client, monkeypatch, source, root: Path, key: str, batch: int | None = None):
    """Re-run the build of ``source`` into ``root`` (a map task ``key`` failed in it): only that task
    runs again, the other 13 are skipped, and the margin is a fresh build's."""
    real = mapping.map_partition
    ran = []
    with monkeypatch.context() as patch:
        if batch is not None:
            patch.setattr(runner, "batch_size", batches_of(batch))
        patch.setattr(mapping, "map_partition", lambda task, *rest: ran.append(task.key) or real(task, *rest))
        result = pipeline_with_client(make_args(source, root), client)
    assert ran == [key] and result.skipped_tasks["mapping"] == 13
    fresh = pipeline_with_client(make_args(source, root / "fresh"), client)
    assert rows_per_pixel(root / "out" / NAME) == rows_per_pixel(root / "fresh" / "out" / NAME)
    assert result.total_rows == fresh.total_rows


def markers_of(base: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((base / "mapping").glob("*.json"))]


@pytest.mark.parametrize("size", [1, 5, 14])
def test_one_shard_and_one_marker_per_batch_of_map_tasks(client, copy_catalog, tmp_path, monkeypatch, size):
    """Intermediate files are O(batches): run.json, then per batch one marker and at most one shard."""
    source = copy_catalog("small_sky_source_catalog")
    monkeypatch.setattr(runner, "batch_size", batches_of(size))
    base = map_only(client, make_args(source, tmp_path), monkeypatch)
    markers = markers_of(base)
    n_batches = -(-14 // size)
    assert len(markers) == n_batches
    tasks = {key: payload for m in markers for key, payload in m["tasks"].items()}
    assert len(tasks) == sum(len(m["tasks"]) for m in markers) == 14, "every task listed once"
    pairs = sum(1 for t in tasks.values() for n in t["rows"].values() if n)
    assert pairs > 2 * len(tasks), "the sample should send rows to several destinations per partition"
    shards = sorted(p.name for p in (base / "shards").rglob("*") if p.is_file())
    assert shards == sorted(f"{m['shard']}.arrow" for m in markers if any(t["rows"] for t in m["tasks"].values()))
    files = [p for p in base.rglob("*") if p.is_file()]
    assert len(files) <= 1 + 2 * n_batches
    for m in markers:
        assert m["format"] == hm_io.INTERMEDIATE_FORMAT
        for payload in m["tasks"].values():
            assert payload["shard"] == m["shard"]
            assert set(payload["batches"]) == {k for k, n in payload["rows"].items() if n}
    assert all(hm_io.TempLayout.owns(str(f.relative_to(base))) for f in files), "every name written is owned"


def test_reduce_reads_only_its_batches(tmp_path):
    """Two sources in one shard, several flushes: each (source, destination) reads back its own rows."""
    layout = TempLayout(UPath(tmp_path))
    layout.make_dirs()
    schema = pa.schema([("_healpix_29", pa.int64()), ("name", pa.string())])
    writers = ShardWriters(layout.shard("2_5-0123abcd"), schema, flush_bytes=200)  # several flushes
    sent: dict[tuple, list[int]] = {}
    rng = np.random.default_rng(1)
    for source in [(2, 5), (2, 6)]:
        view = writers.source(source)
        for step in range(40):
            dest = [(1, 3), (2, 4), (3, 77)][int(rng.integers(3))]
            values = rng.integers(0, 1 << 40, int(rng.integers(1, 6)))
            sent.setdefault((*source, *dest), []).extend(values.tolist())
            view.write(dest, pa.table({"_healpix_29": values, "name": [f"r{step}"] * len(values)}, schema=schema))
        writers.flush()  # a task's end: a record batch never mixes two sources
    writers.close()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["2_5-0123abcd.arrow"]
    batches = [b for source in writers.index.values() for dest in source.values() for b in dest]
    assert sorted(batches) == list(range(len(batches))) and len(batches) > 6
    for (o, p, *dest), values in sent.items():
        table = read_shard(layout.shard("2_5-0123abcd"), writers.index[(o, p)][tuple(dest)])
        assert table.column("_healpix_29").to_pylist() == values
        assert writers.rows[(o, p)][tuple(dest)] == len(values)


def test_failed_shard_write_fails_its_batch_whole_and_resumes(client, copy_catalog, tmp_path, monkeypatch):
    """A shard write that fails mid-batch: no marker, every task of that batch is reported and
    redone (in a new shard) by the re-run, which skips the other batches' tasks."""
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    real = ShardWriters._write_pending

    def failing(self):
        real(self)  # the batches reach the file, then the write fails before its footer and marker
        if self.path.name.startswith("2_180-"):
            raise OSError("simulated write failure")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "batch_size", batches_of(3))
        patch.setattr(ShardWriters, "_write_pending", failing)
        with pytest.raises(StageFailedError, match="mapping") as info:
            pipeline_with_client(args, client)
    base = Path(args.tmp_dir) / NAME / "intermediate"
    failed = sorted(info.value.failures)
    assert "2_180" in failed and len(failed) == 3, failed
    assert list((base / "shards").glob("2_180-*.arrow")) and not list((base / "mapping").glob("2_180-*"))
    done = {key for m in markers_of(base) for key in m["tasks"]}
    assert len(done) == 11 and not done & set(failed)
    result = pipeline_with_client(args, client)
    assert result.skipped_tasks["mapping"] == 11
    fresh = pipeline_with_client(make_args(source, tmp_path / "fresh"), client)
    assert result.total_rows == fresh.total_rows
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "fresh" / "out" / NAME)
    assert is_valid_catalog(str(tmp_path / "out" / NAME), strict=True)


def test_a_failing_task_fails_alone_and_the_rest_of_its_batch_is_kept(client, copy_catalog, tmp_path, monkeypatch):
    """A map task that raises is reported alone, naming its partition; the other tasks of its batch
    are listed in the batch's marker and skipped by the re-run (batched otherwise), whose output
    is that of an uninterrupted run."""
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    real = mapping.map_partition

    def fails_on_2_180(task, *rest):
        if task.key == "2_180":
            raise RuntimeError("simulated task failure")
        return real(task, *rest)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "batch_size", batches_of(5))
        patch.setattr(mapping, "map_partition", fails_on_2_180)
        with pytest.raises(StageFailedError, match="2_180") as info:
            pipeline_with_client(args, client)
    assert list(info.value.failures) == ["2_180"]
    base = Path(args.tmp_dir) / NAME / "intermediate"
    markers = markers_of(base)
    assert len(markers) == 3 and sum(len(m["tasks"]) for m in markers) == 13
    assert any(len(m["tasks"]) == 4 for m in markers), "the failing task's batch still publishes the rest"
    rerun_redoes_only(client, monkeypatch, source, tmp_path, "2_180", batch=2)


@pytest.mark.parametrize(("first", "second"), [(5, 3), (3, 14)])
def test_a_batch_without_marker_is_redone_whole_with_other_batching(client, copy_catalog, tmp_path, monkeypatch,
                                                                    first, second):
    """A batch killed after writing its shard, before its marker (here: the marker removed) is
    redone whole; a re-run batching differently skips exactly the tasks the markers list and
    writes what an uninterrupted run writes."""
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    monkeypatch.setattr(runner, "batch_size", batches_of(first))
    base = map_only(client, args, monkeypatch)
    paths = sorted((base / "mapping").glob("*.json"))
    lost = json.loads(paths[1].read_text())
    paths[1].unlink()
    real = mapping.map_partition
    ran = []
    monkeypatch.setattr(runner, "batch_size", batches_of(second))
    monkeypatch.setattr(mapping, "map_partition", lambda task, *rest: ran.append(task.key) or real(task, *rest))
    result = pipeline_with_client(args, client)
    assert sorted(ran) == sorted(lost["tasks"])
    assert result.skipped_tasks["mapping"] == 14 - len(lost["tasks"])
    monkeypatch.undo()
    fresh = pipeline_with_client(make_args(source, tmp_path / "fresh"), client)
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "fresh" / "out" / NAME)
    assert result.total_rows == fresh.total_rows
    assert is_valid_catalog(str(tmp_path / "out" / NAME), strict=True)


def test_reduce_tasks_write_no_marker_files(client, copy_catalog, tmp_path, monkeypatch):
    """A published margin file is its reduce task's done marker: just before the clean-up the
    intermediate directory holds run.json, one marker per batch of map tasks and its shard, nothing
    per pixel."""
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
    markers = [f for f in files if f.startswith("mapping/")]
    assert 0 < len(shards) <= len(markers) <= 14
    assert len(files) == 1 + len(markers) + len(shards)


def test_resume_skips_published_pixels_and_redoes_short_ones(client, copy_catalog, tmp_path, monkeypatch):
    """A re-run redoes exactly the pixels whose file is missing or does not hold the rows the map
    stage sent it (here: failed tasks, and one published file replaced by a shorter one)."""
    import pyarrow.parquet as pq

    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    flag = tmp_path / "failed.txt"
    real = reducing.reduce_pixel

    def half_fail(task, *rest):
        if task.pixel[1] % 2:
            with open(flag, "a") as handle:  # Dask may pickle this function by value: report via a file
                handle.write(f"{task.key}\n")
            raise RuntimeError("simulated reduce failure")
        return real(task, *rest)

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


def test_the_shard_buffer_counts_each_slice_by_its_rows_and_flushes_at_its_limit(tmp_path):
    """The map task sends zero-copy slices of its taken rows: each counts its share of the rows
    (not the whole parent, and without ``nbytes``' walk over every column), so the buffer flushes
    once it holds ``flush_bytes``, and a failed task's dropped rows leave the count as it was."""
    from hats_margin.geometry import Tiling
    from hats_margin.stages.mapping import _send

    layout = TempLayout(UPath(tmp_path))
    layout.make_dirs()
    rows = 1000
    table = pa.table({"_healpix_29": np.arange(rows, dtype=np.int64), "x": np.arange(rows, dtype=np.float64)})
    size = table.get_total_buffer_size()
    dests = Tiling.from_pixels(np.array([3] * 10), np.arange(10))
    dest_idx = np.repeat(np.arange(10), rows // 10)  # ten destinations of 100 rows each

    writers = ShardWriters(layout.shard("2_5-0123abcd"), table.schema, flush_bytes=10 * size)
    _send(writers.source((2, 5)), table, dests, dest_idx)
    assert writers._pending_bytes == size, "ten slices of a tenth each: the table once"
    assert writers._writer is None, "under the limit: nothing written yet"
    writers.drop((2, 5))
    assert writers._pending_bytes == 0 and not writers._pending

    writers = ShardWriters(layout.shard("2_6-0123abcd"), table.schema, flush_bytes=size // 2)
    _send(writers.source((2, 6)), table, dests, dest_idx)
    assert writers._writer is not None, "half the table buffered: flushed"
    assert writers._pending_bytes < size // 2
    writers.close()
    index = writers.index[(2, 6)]
    assert sum(read_shard(layout.shard("2_6-0123abcd"), b).num_rows for b in index.values()) == rows


def _count_calls(monkeypatch, log: Path):
    """Record, in ``log`` (Dask pickles the wrapper), how many row groups each exact test decides."""
    real = mapping.pairs_within_thresholds_of_parts

    def counting(parts, thresholds):
        with open(log, "a") as handle:
            handle.write(f"{len(parts)}\n")
        return real(parts, thresholds)

    monkeypatch.setattr(mapping, "pairs_within_thresholds_of_parts", counting)


@pytest.mark.parametrize(("size", "limit"), [(14, 64), (14, 3), (1, 64)])
def test_small_row_groups_of_a_batch_are_tested_together(client, copy_catalog, tmp_path, monkeypatch, size, limit):
    """The candidates of a batch's small row groups wait and are decided in one exact test (at
    most ``DEFER_ROW_GROUPS`` row groups per test), and the margin is the one that a test per row group
    gives: a batch of one task, or no waiting at all."""
    source = copy_catalog("small_sky_source_catalog")
    log = tmp_path / "calls.txt"
    monkeypatch.setattr(runner, "batch_size", batches_of(size))
    monkeypatch.setattr(mapping, "DEFER_ROW_GROUPS", limit)
    _count_calls(monkeypatch, log)
    result = pipeline_with_client(make_args(source, tmp_path), client)
    calls = [int(n) for n in log.read_text().split()]
    tested = sum(calls)  # row groups with candidates (each one decided once)
    assert tested >= 13 and max(calls) <= limit
    if size == 1:
        assert len(calls) <= 14  # one test per task at most: never across tasks of other batches
    else:
        assert len(calls) == -(-tested // limit)
    monkeypatch.setattr(mapping, "DEFER_ROW_GROUPS", 1)  # each row group its own test
    alone = pipeline_with_client(make_args(source, tmp_path / "alone"), client)
    assert rows_per_pixel(tmp_path / "out" / NAME) == rows_per_pixel(tmp_path / "alone" / "out" / NAME)
    assert result.total_rows == alone.total_rows > 0
    files = sorted(p.relative_to(tmp_path / "out" / NAME) for p in (tmp_path / "out" / NAME / "dataset").rglob("Npix=*.parquet"))
    assert files
    for rel in files:  # the same rows in the same order
        assert pq.read_table(tmp_path / "out" / NAME / rel).equals(pq.read_table(tmp_path / "alone" / "out" / NAME / rel)), rel


def test_a_task_whose_waiting_rows_cannot_be_sent_fails_alone(client, copy_catalog, tmp_path, monkeypatch):
    """A send that fails after the batch's joint exact test fails its own task only, naming its
    partition; the batch's marker lists the others and the re-run redoes that task alone."""
    source = copy_catalog("small_sky_source_catalog")
    args = make_args(source, tmp_path)
    real = mapping._Candidates.send

    def fails_for_2_180(self, within):
        if self.task.key == "2_180":
            raise RuntimeError("simulated send failure")
        return real(self, within)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "batch_size", batches_of(14))
        patch.setattr(mapping._Candidates, "send", fails_for_2_180)
        with pytest.raises(StageFailedError, match="2_180") as info:
            pipeline_with_client(args, client)
    assert list(info.value.failures) == ["2_180"]
    assert any("Norder=2/Npix=180" in note for note in info.value.failures["2_180"].__notes__)
    markers = markers_of(Path(args.tmp_dir) / NAME / "intermediate")
    assert len(markers) == 1 and len(markers[0]["tasks"]) == 13 and "2_180" not in markers[0]["tasks"]
    rerun_redoes_only(client, monkeypatch, source, tmp_path, "2_180")


def test_a_task_failing_after_some_of_its_row_groups_wait_sends_none_of_them(client, wide_row_groups, tmp_path,
                                                                             monkeypatch):
    """A task that fails on a later row group, its earlier small row groups' candidates waiting for
    the batch's joint test, sends none of them; the other tasks of the batch send theirs and are
    listed in the marker."""
    keys = sorted(f"{o}_{p}" for o, p in (map(int, line.split(",")[:2])
                  for line in (wide_row_groups / "partition_info.csv").read_text().split()[1:]))
    failing = keys[0]
    calls, sent = tmp_path / "calls.txt", tmp_path / "sent.txt"
    real_check, real_send = mapping._check_rows_in_partition, mapping._Candidates.send

    def fails_on_the_third_row_group(task, path, spatial_index):
        with open(calls, "a") as handle:
            handle.write(task.key + "\n")
        if task.key == failing and calls.read_text().split().count(failing) == 3:
            raise RuntimeError("simulated failure on a later row group")
        return real_check(task, path, spatial_index)

    def recording_send(self, within):
        with open(sent, "a") as handle:
            handle.write(self.task.key + "\n")
        return real_send(self, within)

    monkeypatch.setattr(runner, "batch_size", batches_of(len(keys)))
    monkeypatch.setattr(mapping, "_check_rows_in_partition", fails_on_the_third_row_group)
    monkeypatch.setattr(mapping._Candidates, "send", recording_send)
    args = make_args(wide_row_groups, tmp_path)
    with pytest.raises(StageFailedError, match=failing) as info:
        pipeline_with_client(args, client)
    assert list(info.value.failures) == [failing]
    assert calls.read_text().split().count(failing) == 3  # two of its row groups waited first
    sent_by = set(sent.read_text().split())
    assert failing not in sent_by and sent_by == set(keys) - {failing}
    (marker,) = markers_of(Path(args.tmp_dir) / NAME / "intermediate")
    assert sorted(marker["tasks"]) == sorted(set(keys) - {failing})
    assert all(any(payload["rows"].values()) for payload in marker["tasks"].values())

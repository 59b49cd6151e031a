"""The reduce step never damages a published margin file (issue 13 item 5)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from upath import UPath

from hats_margin.io import ShardWriters, TempLayout, output_file
from hats_margin.stages.reducing import ReduceTask, reduce_pixel

SCHEMA = pa.schema([("_healpix_29", pa.int64()), ("value", pa.float64())])
PIXEL = (2, 176)


def make_task(tmp_path, sources, expected_rows) -> ReduceTask:
    layout = TempLayout(UPath(tmp_path / "intermediate"))
    layout.make_dirs()
    return ReduceTask(
        # each test shard (one per source here) holds one record batch: the destination's rows
        key="2_176", pixel=PIXEL, sources=tuple((o, p, f"{o}_{p}-00000000", (0,)) for o, p in sources),
        expected_rows=expected_rows,
        output_file=output_file(UPath(tmp_path / "catalog"), *PIXEL, ".parquet", None),
        schema=SCHEMA, healpix_column="_healpix_29", write_kwargs={"row_group_size": 2}, layout=layout,
    )


def write_shard(task: ReduceTask, source, rows: int, start: int = 0):
    """A shard of ``rows`` rows for the task's pixel, spatial index ``start + rows`` down to ``start + 1``."""
    writers = ShardWriters(task.layout.shard(f"{source[0]}_{source[1]}-00000000"), SCHEMA)
    table = pa.table({"_healpix_29": list(range(start + rows, start, -1)), "value": [float(i) for i in range(rows)]},
                     schema=SCHEMA)
    writers.write((*source, *task.pixel), table)
    writers.close()


def publish_earlier_file(task: ReduceTask) -> bytes:
    path = task.output_file.path
    UPath(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"_healpix_29": [7, 8, 9], "value": [1.0, 2.0, 3.0]}, schema=SCHEMA), path)
    return UPath(path).read_bytes()


def test_a_failing_reduce_leaves_the_published_file_whole(tmp_path):
    """It opened the final file before reading its shards: a bad second shard truncated it."""
    task = make_task(tmp_path, [(2, 177), (2, 178)], expected_rows=7)
    write_shard(task, (2, 177), 4)
    task.layout.shard("2_178-00000000").write_bytes(b"not an arrow file")
    before = publish_earlier_file(task)
    with pytest.raises(pa.ArrowInvalid):
        reduce_pixel(task)
    assert task.output_file.read_bytes() == before
    assert sorted(p.name for p in task.output_file.parent.iterdir()) == ["Npix=176.parquet"]


def test_a_reduce_short_of_rows_publishes_nothing(tmp_path):
    task = make_task(tmp_path, [(2, 177)], expected_rows=5)
    write_shard(task, (2, 177), 4)
    with pytest.raises(RuntimeError, match="wrote 4 rows, the map stage sent 5"):
        reduce_pixel(task)
    assert not task.output_file.parent.exists() or not any(task.output_file.parent.iterdir())


def test_a_successful_reduce_replaces_the_file_whole(tmp_path):
    task = make_task(tmp_path, [(2, 177), (2, 178)], expected_rows=7)
    write_shard(task, (2, 177), 4)
    write_shard(task, (2, 178), 3, start=10)  # sources cover disjoint spatial-index ranges
    publish_earlier_file(task)
    result = reduce_pixel(task)
    assert {k: result[k] for k in ("pixel", "rows")} == {"pixel": list(PIXEL), "rows": 7}
    assert result["footer"] == pq.read_metadata(task.output_file.path), "the footer it returns is the file's"
    table = pq.read_table(task.output_file.path)
    assert table.num_rows == 7 and table["_healpix_29"].to_pylist() == [1, 2, 3, 4, 11, 12, 13]
    assert sorted(p.name for p in task.output_file.parent.iterdir()) == ["Npix=176.parquet"]


def test_a_batch_opens_each_shard_once_and_keeps_failures_apart(tmp_path, monkeypatch):
    """The reduce tasks of one batch read the same shards: each is opened (its footer parsed) once;
    a task whose shard is bad fails alone."""
    from hats_margin import io
    from hats_margin.stages import reducing

    good = make_task(tmp_path, [(2, 177), (2, 178)], expected_rows=7)
    write_shard(good, (2, 177), 4)
    write_shard(good, (2, 178), 3, start=10)
    same_shards = dataclasses.replace(
        good, key="2_179", pixel=(2, 179), output_file=output_file(UPath(tmp_path / "catalog"), 2, 179, ".parquet", None)
    )
    bad = dataclasses.replace(
        good, key="2_180", pixel=(2, 180), sources=((2, 181, "2_181-00000000", (0,)),),
        output_file=output_file(UPath(tmp_path / "catalog"), 2, 180, ".parquet", None),
    )
    good.layout.shard("2_181-00000000").write_bytes(b"not an arrow file")
    opened = []
    real_open = io.ipc.open_file
    monkeypatch.setattr(io.ipc, "open_file", lambda source: opened.append(1) or real_open(source))
    outcome = reducing.reduce_batch([good, bad, same_shards])
    assert [key for key, (ok, _) in outcome.items() if not ok] == ["2_180"]
    assert isinstance(outcome["2_180"][1], pa.ArrowInvalid)
    assert len(opened) == 3, "two good shards opened once for two tasks, plus the bad one"
    for task in (good, same_shards):
        assert pq.read_table(task.output_file.path)["_healpix_29"].to_pylist() == [1, 2, 3, 4, 11, 12, 13]
    assert not bad.output_file.exists()


def test_shard_readers_close_the_least_recently_used_over_the_limit(tmp_path):
    from hats_margin.io import ShardReaders

    task = make_task(tmp_path, [], expected_rows=0)
    for pixel in (1, 2, 3):
        write_shard(task, (2, pixel), pixel)
    with ShardReaders(limit=2) as readers:
        for pixel in (1, 2, 1, 3, 2, 1):
            assert readers.read(task.layout, f"2_{pixel}-00000000", [0]).num_rows == pixel
            assert len(readers._open) <= 2
        assert [batch for _, batch in readers._open] == ["2_2-00000000", "2_1-00000000"]
    assert not readers._open


def test_small_sources_sorted_in_groups_give_the_same_file(tmp_path, monkeypatch):
    """Consecutive sources are sorted together up to SORT_GROUP_BYTES: one sort per small margin,
    the same file as one sort per source."""
    from hats_margin.stages import reducing

    task = make_task(tmp_path, [(2, 177), (2, 178), (2, 179)], expected_rows=9)
    for i, source in enumerate([(2, 177), (2, 178), (2, 179)]):
        write_shard(task, source, 3, start=10 * i)
    reduce_pixel(task)
    together = pq.read_table(task.output_file.path)
    monkeypatch.setattr(reducing, "SORT_GROUP_BYTES", 1)  # every source alone
    reduce_pixel(task)
    assert pq.read_table(task.output_file.path).equals(together)
    assert together["_healpix_29"].to_pylist() == [1, 2, 3, 11, 12, 13, 21, 22, 23]


def _tasks_of_one_batch(tmp_path, n: int) -> list[ReduceTask]:
    """``n`` reduce tasks (pixels 2/176+i) reading one shard each, 4 rows per task (a small file)."""
    base = dataclasses.replace(make_task(tmp_path, [], expected_rows=4), write_kwargs={})
    tasks = []
    for i in range(n):
        pixel = (2, 176 + i)
        task = dataclasses.replace(
            base, key=f"2_{pixel[1]}", pixel=pixel, sources=((2, 100 + i, f"2_{100 + i}-00000000", (0,)),),
            output_file=output_file(UPath(tmp_path / "catalog"), *pixel, ".parquet", None),
        )
        write_shard(task, (2, 100 + i), 4)
        tasks.append(task)
    return tasks


def test_small_files_written_behind_keep_each_task_outcome_apart(tmp_path, monkeypatch):
    """Small files are encoded and published in the batch's write threads: a task failing there (its
    row count is wrong) fails alone, names its pixel and leaves no temporary file; the others are
    published, sorted, by the time the batch returns."""
    from hats_margin.stages import reducing

    tasks = _tasks_of_one_batch(tmp_path, 6)
    tasks[2] = dataclasses.replace(tasks[2], expected_rows=5)
    in_thread = []
    real_close = reducing.MarginFileWriter.close

    def close(self):
        in_thread.append(threading.current_thread().name)
        return real_close(self)

    monkeypatch.setattr(reducing.MarginFileWriter, "close", close)
    outcome = reducing.reduce_batch(tasks)
    assert list(outcome) == [t.key for t in tasks]
    assert [ok for ok, _ in outcome.values()] == [True, True, False, True, True, True]
    error = outcome[tasks[2].key][1]
    assert "wrote 4 rows, the map stage sent 5" in str(error)
    assert any("Norder=2/Npix=178" in note for note in error.__notes__)
    assert all(name.startswith("hats-margin-write") for name in in_thread), in_thread
    for i, task in enumerate(tasks):
        siblings = sorted(p.name for p in task.output_file.parent.iterdir())
        assert not [n for n in siblings if n.startswith(".")], siblings
        if i == 2:
            assert not task.output_file.exists()
        else:
            assert pq.read_table(task.output_file.path)["_healpix_29"].to_pylist() == [1, 2, 3, 4]
            assert outcome[task.key][1]["footer"] == pq.read_metadata(task.output_file.path)


def test_small_files_waiting_to_be_written_are_bounded(tmp_path, monkeypatch):
    """Memory: at most WRITE_BEHIND small files of a batch wait for the write threads (here slowed
    down) beside the one being read."""
    from hats_margin.stages import reducing

    tasks = _tasks_of_one_batch(tmp_path, 12)
    state = {"read": 0, "published": 0, "most": 0}
    lock = threading.Lock()
    real_reduce, real_publish = reducing.reduce_pixel, reducing.publish

    def counting_reduce(task, *rest):
        with lock:
            state["read"] += 1
            state["most"] = max(state["most"], state["read"] - state["published"])
        return real_reduce(task, *rest)

    def slow_publish(temporary, final):
        time.sleep(0.05)
        real_publish(temporary, final)
        with lock:
            state["published"] += 1

    monkeypatch.setattr(reducing, "reduce_pixel", counting_reduce)
    monkeypatch.setattr(reducing, "publish", slow_publish)
    outcome = reducing.reduce_batch(tasks)
    assert all(ok for ok, _ in outcome.values())
    assert state["published"] == len(tasks)
    assert state["most"] == reducing.WRITE_BEHIND + 1, state


def test_a_large_file_is_written_by_the_batch_thread_itself(tmp_path, monkeypatch):
    """A file that outgrew memory (streamed row group by row group) is closed in the batch's own
    thread: its last row group may be large, and is not handed over."""
    from hats_margin import io
    from hats_margin.stages import reducing

    monkeypatch.setattr(io, "SMALL_FILE_BYTES", 0)
    tasks = _tasks_of_one_batch(tmp_path, 2)
    in_thread = []
    real_close = reducing.MarginFileWriter.close
    monkeypatch.setattr(
        reducing.MarginFileWriter, "close",
        lambda self: in_thread.append(threading.current_thread().name) or real_close(self),
    )
    outcome = reducing.reduce_batch(tasks)
    assert all(ok for ok, _ in outcome.values())
    assert in_thread == [threading.current_thread().name] * 2


def _margins_of_one_pixel(tmp_path):
    """Three margins (0 the largest) of pixel 2/176 from two sources' shards holding each row once,
    marked with its margins (bits, as the map stage writes them); the rows each margin must hold."""
    from hats_margin.io import MARGINS_COLUMN, shard_schema

    schema = shard_schema(SCHEMA, 3)
    base = make_task(tmp_path, [], expected_rows=0)
    per_margin = {0: [], 1: [], 2: []}
    sources = []
    # rows out of order within a source; equal spatial indexes (order 29 cells shared by
    # two rows with different margins, e.g. a spatial index of a coarser order) keep their order
    rows = {(2, 177): [(5, 0b111), (3, 0b001), (5, 0b011), (4, 0b001), (3, 0b111)],
            (2, 178): [(12, 0b001), (11, 0b001), (12, 0b011)]}
    for source, values in rows.items():
        batch = f"{source[0]}_{source[1]}-00000000"
        table = pa.table({"_healpix_29": [v for v, _ in values], "value": [float(i) for i in range(len(values))],
                          MARGINS_COLUMN: pa.array([b for _, b in values], pa.uint8())}, schema=schema)
        writers = ShardWriters(base.layout.shard(batch), schema)
        writers.write((*source, *PIXEL), table)
        writers.close()
        for margin in per_margin:
            if any(b >> margin & 1 for _, b in values):
                sources.append((margin, (*source, batch, (0,))))
        for i, (v, b) in enumerate(values):
            for margin, kept in per_margin.items():
                if b >> margin & 1:
                    kept.append((v, float(i)))
    tasks = {}
    for margin, expected in per_margin.items():
        tasks[margin] = dataclasses.replace(
            base, key=f"{margin}:2_176", margin=margin, expected_rows=len(expected),
            sources=tuple(s for m, s in sources if m == margin),
            output_file=output_file(UPath(tmp_path / f"catalog{margin}"), *PIXEL, ".parquet", None),
        )
        # what a margin's file holds: its rows, stably sorted by the spatial index
        per_margin[margin] = sorted(expected, key=lambda r: r[0])
    return tasks, per_margin


@pytest.mark.parametrize(("order", "reads"), [([0, 1, 2], 2), ([2, 1, 0], 3), ([1, 0, 2], 2)],
                         ids=["largest-first", "smallest-first", "same-sources-first"])
def test_the_margins_of_a_pixel_read_their_rows_once_and_keep_their_own(tmp_path, monkeypatch, order, reads):
    """Several margins from one read: the record batches of a pixel hold every margin's rows once;
    each margin's file holds exactly its rows, sorted, in their order among equal spatial indexes,
    whatever order the batch runs the margins in. A margin reuses the rows the previous one read
    if they include every source it reads (largest first: each record batch is read once);
    margin 2 reads one source, margins 0 and 1 both."""
    from hats_margin import io
    from hats_margin.stages import reducing

    tasks, expected = _margins_of_one_pixel(tmp_path)
    readers = []
    real = io.ShardReaders.__init__
    monkeypatch.setattr(reducing.ShardReaders, "__init__", lambda self, *a: readers.append(self) or real(self, *a))
    outcome = reducing.reduce_batch([tasks[m] for m in order])
    assert all(ok for ok, _ in outcome.values()), outcome
    for margin, task in tasks.items():
        table = pq.read_table(task.output_file.path)
        assert table.schema.names == SCHEMA.names, "the margins column is not written"
        assert list(zip(table["_healpix_29"].to_pylist(), table["value"].to_pylist())) == expected[margin], margin
    assert expected[2] and len(expected[2]) < len(expected[1]) < len(expected[0])
    assert readers[0].batches_read == reads


def test_the_margins_of_a_pixel_too_large_to_keep_are_read_again(tmp_path, monkeypatch):
    """A pixel whose rows are sorted in several groups is not kept: each margin reads its own,
    and the files are the same."""
    from hats_margin.stages import reducing

    tasks, expected = _margins_of_one_pixel(tmp_path)
    monkeypatch.setattr(reducing, "SORT_GROUP_BYTES", 1)
    readers = []
    real = reducing.ShardReaders.__init__
    monkeypatch.setattr(reducing.ShardReaders, "__init__", lambda self, *a: readers.append(self) or real(self, *a))
    outcome = reducing.reduce_batch([tasks[m] for m in (0, 1, 2)])
    assert all(ok for ok, _ in outcome.values()), outcome
    for margin, task in tasks.items():
        table = pq.read_table(task.output_file.path)
        assert list(zip(table["_healpix_29"].to_pylist(), table["value"].to_pylist())) == expected[margin], margin
    assert readers[0].batches_read == sum(len(t.sources) for t in tasks.values())

"""The reduce step never damages a published margin file (issue 13 item 5)."""

from __future__ import annotations

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


def write_shard(task: ReduceTask, source, rows: int):
    writers = ShardWriters(task.layout.shard(f"{source[0]}_{source[1]}-00000000"), SCHEMA)
    table = pa.table({"_healpix_29": list(range(rows, 0, -1)), "value": [float(i) for i in range(rows)]},
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
    write_shard(task, (2, 178), 3)
    publish_earlier_file(task)
    result = reduce_pixel(task)
    assert {k: result[k] for k in ("pixel", "rows")} == {"pixel": list(PIXEL), "rows": 7}
    assert result["footer"] == pq.read_metadata(task.output_file.path), "the footer it returns is the file's"
    table = pq.read_table(task.output_file.path)
    assert table.num_rows == 7 and table["_healpix_29"].to_pylist() == [1, 2, 3, 4, 1, 2, 3]
    assert sorted(p.name for p in task.output_file.parent.iterdir()) == ["Npix=176.parquet"]
